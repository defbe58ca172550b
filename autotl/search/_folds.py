"""Honest selection: which labelled images train, decide and score each trial.

One small validation split used to decide early stopping, the data-dropout reference *and* the
ranking of trials flatters the search: the winner is whatever happened to fit that split. Here no
image both decides something about a trial and scores it:

- ``cv`` (no ``val/`` folder, fewer than ``CV_MAX_IMAGES`` labelled images): stratified k-fold over
  all labelled images (repeated with a new partition when tiny). Fold j scores on its held-out
  part; its other images are split into a training part and a *decision* part (early stopping and
  the dropout reference: cross-fitting).
- ``val-cv`` (the user gave a ``val/`` folder): that folder is trusted — it may be cleaner than
  ``train/`` (noisy labels), and then only it can tell a good dropout from a bad one — so it is
  cross-fitted on its own: fold j scores on part j of val and decides on the rest of val; every
  fold trains on ``train/``.
- ``holdout`` (many images): one stratified split into a decision part and a scoring part (of
  val when given, else of all labelled images).

Copies never straddle a split: byte-identical files and the near-duplicates the scan confirms
(``DatasetIndex.duplicate_groups(near=True)``) are one unit. In ``cv`` and ``holdout`` a unit goes
whole into one part — scoring, deciding or fitting (``keep_together``, applied after every split).
In ``val-cv`` and a trusted ``holdout`` the parts are cut from ``val/`` alone, and a ``train/``
image with a twin in ``val/`` trains no fold (``apart_from``): in every fold that twin either scores
or decides, so training on the copy would either flatter the score or stop early on an image it
has learnt. It is left out rather than moved into ``val/``: val is the trusted set (its labels may
be cleaner than train's), and the twin's picture is already there, so moving it would only count
that picture twice. The refit still trains on it.

After the search the winner is refitted on *all* labelled images for the epoch count its folds
chose, so no split is wasted on the final model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..data import DatasetIndex, Sample
from ..estimate import fold_spread_se
from ..options import SearchOptions

CV_MAX_IMAGES = 2000  # at or above: one holdout split is precise enough and k times cheaper
DEFAULT_FOLDS = SearchOptions.cv_folds  # --cv-folds
TINY_IMAGES = 200  # below: repeat the k-fold partition (a fold of 8 images is a coarse estimate)
DECIDE_FRACTION = 0.2  # share of a cv fold's training part that decides early stopping and dropout


@dataclass(frozen=True)
class Fold:
    """One train / decide / score partition (disjoint lists of samples)."""

    train: tuple[Sample, ...]
    decide: tuple[Sample, ...]  # early stopping + data-dropout reference
    score: tuple[Sample, ...]  # the trial's score on this fold; decides nothing else


@dataclass
class Selection:
    """How trials are scored: the folds and what they mean, for the card and the report."""

    kind: str  # "cv" | "val-cv" | "holdout"
    folds: list[Fold]
    k: int
    repeats: int
    seed: int
    decided_by: dict[str, str] = field(default_factory=dict)
    # folds where no class could spare an image for a decision part: they stop early on their own
    # training images (in effect a fixed epoch count) and have no data-dropout reference
    self_decided: int = 0

    @property
    def n_scored(self) -> int:
        """Distinct images that score trials (each once per partition)."""
        return len({s.path for f in self.folds for s in f.score})

    @property
    def scored_samples(self) -> list[Sample]:
        """Every image that scores trials, once, in a fixed order: the rows of out-of-fold predictions."""
        seen: dict[str, Sample] = {}
        for f in self.folds:
            for s in f.score:
                seen.setdefault(str(s.path), s)
        return [seen[k] for k in sorted(seen)]

    def standard_error(self, fold_scores: Sequence[float]) -> float:
        """Standard error of a trial's mean score: the larger of the spread over folds (per partition:
        repeated partitions reuse the same images, so they are not independent) and the binomial
        error of a proportion measured on ``n_scored`` images, Agresti–Coull style (two successes
        and two failures added), so that a perfect score on 40 images is not taken as certain."""
        mean = sum(fold_scores) / len(fold_scores)
        spread = fold_spread_se(fold_scores, self.k)
        n = max(1, self.n_scored) + 4
        p = (mean * (n - 4) + 2) / n
        return max(spread, math.sqrt(p * (1 - p) / n))

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "k": self.k, "repeats": self.repeats, "n_folds": len(self.folds), "seed": self.seed,
            "n_scored": self.n_scored,
            "fold_sizes": [{"train": len(f.train), "decide": len(f.decide), "score": len(f.score)} for f in self.folds],
            "decided_by": self.decided_by, "self_decided_folds": self.self_decided,
        }


def _by_class(samples: Sequence[Sample]) -> dict[int, list[Sample]]:
    out: dict[int, list[Sample]] = {}
    for s in samples:
        out.setdefault(s.label, []).append(s)
    return out


def stratified_folds(samples: Sequence[Sample], k: int, rng: np.random.Generator) -> list[list[Sample]]:
    """``k`` disjoint folds covering ``samples``, each class spread as evenly as its count allows.

    Each class's remainder starts where the previous class's ended, so fold sizes differ by at
    most one even with many small classes."""
    folds: list[list[Sample]] = [[] for _ in range(k)]
    offset = 0
    for _, members in sorted(_by_class(samples).items()):
        order = rng.permutation(len(members))
        for i, j in enumerate(order):
            folds[(offset + i) % k].append(members[j])
        offset += len(members)
    return folds


def stratified_split(samples: Sequence[Sample], fraction: float, rng: np.random.Generator) -> tuple[list[Sample], list[Sample]]:
    """(rest, part): ``part`` holds ``fraction`` of every class (at least one image where a class
    has two or more, so every class can stop early and be referenced)."""
    rest, part = [], []
    for _, members in sorted(_by_class(samples).items()):
        order = rng.permutation(len(members))
        n = int(round(fraction * len(members)))
        n = min(len(members) - 1, max(1, n)) if len(members) >= 2 else 0
        part += [members[j] for j in order[:n]]
        rest += [members[j] for j in order[n:]]
    return rest, part


def keep_together(parts: Sequence[Sequence[Sample]], groups: Sequence[Sequence[Any]]) -> list[list[Sample]]:
    """Move copies (``groups`` of paths: byte-identical or near-duplicates) into the part of their
    first member present: a copy scoring a fold its twin trained or decided on would flatter that
    fold, and one deciding what its twin trained on would stop training late."""
    where = {s.path: i for i, part in enumerate(parts) for s in part}
    target: dict[Any, int] = {}
    for group in groups:
        present = [p for p in group if p in where]
        for p in present[1:]:
            target[p] = where[present[0]]
    if not target:
        return [list(part) for part in parts]
    out: list[list[Sample]] = [[] for _ in parts]
    for i, part in enumerate(parts):
        for s in part:
            out[target.get(s.path, i)].append(s)
    return out


MIN_CLASS_IMAGES_FOR_DECISION = 3  # per class: one to train, one to decide, one to score


def _fold_or_self_decided(fit_part: list[Sample], decide: list[Sample], score: list[Sample]) -> Fold:
    """The fold; when no class of its training part could spare an image for the decision part, the
    training part decides too (``Selection.self_decided`` counts them). Its score stays honest: the
    scoring part still decides nothing."""
    if decide:
        return Fold(tuple(fit_part), tuple(decide), tuple(score))
    train = tuple(fit_part)
    return Fold(train, train, tuple(score))


def apart_from(samples: Sequence[Sample], others: Sequence[Sample], groups: Sequence[Sequence[Any]]) -> list[Sample]:
    """``samples`` less those with a copy (``groups`` of paths) among ``others``."""
    other = {s.path for s in others}
    twins = {p for group in groups if other.intersection(group) for p in group} - other
    return [s for s in samples if s.path not in twins]


def copy_groups(index: DatasetIndex) -> list[list[Any]]:
    """The units no split may cut: byte-identical copies and confirmed near-duplicates."""
    return index.duplicate_groups(near=True) if hasattr(index, "duplicate_groups") else []


def _folds_for(min_count: int, k: int) -> int:
    return max(2, min(k, min_count))


def plan_selection(index: DatasetIndex, *, seed: int = 0, k: int = DEFAULT_FOLDS, max_cv: int = CV_MAX_IMAGES,
                   repeats: int | None = None, trust_val: bool = True) -> Selection:
    """The folds that score trials for this data set (deterministic in ``seed``). ``trust_val=False``:
    a given ``val/`` folder is not held apart (its labels are no cleaner than ``train/``'s, see
    ``_probe.val_is_cleaner``), so the folds draw on all labelled images."""
    train, val = list(index.train), list(index.val)
    labelled = train + val
    trusted_val = trust_val and index.split == "folders" and bool(val)
    n = len(labelled)
    groups = copy_groups(index)
    if n >= max_cv:
        rng = np.random.default_rng([seed, 0x5E1])
        if trusted_val:
            decide, score = keep_together(stratified_split(val, 0.5, rng), groups)
            folds = [Fold(tuple(apart_from(train, val, groups)), tuple(decide), tuple(score))]
            what = "half of the val/ folder"
        else:
            rest, score = keep_together(stratified_split(labelled, 0.1, rng), groups)
            fit_part, decide = keep_together(stratified_split(rest, 1 / 9, rng), groups)
            folds = [Fold(tuple(fit_part), tuple(decide), tuple(score))]
            what = "a stratified 10% of the labelled images"
        return Selection("holdout", folds, 1, 1, seed, {
            "trial_training": "train/ folder" if trusted_val else "80% of the labelled images",
            "early_stopping_and_dropout_reference": "the other half of the val/ folder" if trusted_val else
                                                     "another stratified 10% of the labelled images",
            "trial_ranking": f"{what}, used for nothing else (one-standard-error rule toward the recipe's portfolio, then the simpler strategy)",
        })
    pool = val if trusted_val else labelled
    counts = [len(m) for m in _by_class(pool).values()]
    kk = _folds_for(min(counts), k)
    reps = repeats if repeats is not None else (2 if n < TINY_IMAGES else 1)
    trained = apart_from(train, val, groups)  # val-cv: every val image decides or scores in every fold
    folds, self_decided = [], 0
    for r in range(reps):
        rng = np.random.default_rng([seed, 0xCF, r])
        parts = keep_together(stratified_folds(pool, kk, rng), groups)
        for j in range(kk):
            others = [s for i, p in enumerate(parts) if i != j for s in p]
            if trusted_val:
                folds.append(Fold(tuple(trained), tuple(others), tuple(parts[j])))
            else:
                fit_part, decide = keep_together(stratified_split(others, DECIDE_FRACTION, rng), groups)
                self_decided += not decide
                folds.append(_fold_or_self_decided(fit_part, decide, parts[j]))
    rep = f", {reps} partitions" if reps > 1 else ""
    if trusted_val:
        return Selection("val-cv", folds, kk, reps, seed, {
            "trial_training": "train/ folder (every fold)",
            "early_stopping_and_dropout_reference": f"the other {kk - 1} parts of the val/ folder (cross-fitted)",
            "trial_ranking": f"{kk}-fold cross-validation over the val/ folder{rep}: each val image scores only in the "
                             "fold where it decided nothing; mean score, one-standard-error rule toward the recipe's portfolio, then the simpler strategy",
        })
    decision = f"a stratified {DECIDE_FRACTION:.0%} of each fold's training images (cross-fitted)"
    if self_decided:
        decision += (f"; in {self_decided} of {len(folds)} folds no class could spare an image (the smallest class has "
                     f"{min(counts)} labelled images, {MIN_CLASS_IMAGES_FOR_DECISION} are needed), so those folds stop "
                     "on their own training images (in effect a fixed epoch count) and data dropout is not searched")
    return Selection("cv", folds, kk, reps, seed, {
        "trial_training": f"{kk - 1} of {kk} stratified folds of all labelled images, less their decision part",
        "early_stopping_and_dropout_reference": decision,
        "trial_ranking": f"stratified {kk}-fold cross-validation over all labelled images{rep}: each image scores only in the "
                         "fold that never trained, stopped or referenced on it; mean score, one-standard-error rule "
                         "toward the recipe's portfolio, then the simpler strategy",
    }, self_decided)
