"""Probe trials: every fold of a linear-probe trial solved at once on the run's cached features.

A probe trial (``frozen_stages: all``) does not run the training loop per fold: its strategies
(data dropout, the feature layout) pick each fold's training images, then one batched convex solve
(``autotl.probe``) fits every fold for a path of penalties, strongest first, each warm-started from
the last. The penalty is chosen inside the trial by the out-of-fold log loss (a smooth, proper
score: on a few dozen scored images accuracy moves in whole images and cannot rank penalties), and
every penalty's per-fold scores are kept, so the final estimate can account for that choice too.
A strategy may set another rule (``StrategyContext.choose_penalty``).

A probe trains on all of a fold's non-scoring images (its training and decision parts): without
early stopping there is nothing for the decision part to decide, except the data-dropout reference,
whose images are then trained on but never dropped.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..probe import DEFAULT_LAMBDAS, FeatureSpec, ReducedFeatures, feature_matrix
from ..strategy import StrategyContext, apply_strategies
from ..train import classification_metrics
from ._oof import OutOfFold

LAMBDAS = DEFAULT_LAMBDAS


def probe_rows_key(spec: FeatureSpec) -> tuple:
    return ("probe-features", spec.models, spec.taps, spec.flip)


class ProbeTable:
    """The labelled images as rows (centre views, then flipped views) and, per feature layout, the
    reduced features over them; kept in the run's bounded memory so trials share them."""

    def __init__(self, run, samples: Sequence):
        self.run = run
        self.samples = list(samples)
        self.row = {str(s.path): i for i, s in enumerate(self.samples)}
        self.labels = torch.tensor([s.label for s in self.samples], dtype=torch.long)

    def features(self, spec: FeatureSpec) -> ReducedFeatures:
        def rows() -> torch.Tensor:
            return torch.cat([feature_matrix(spec, self.run.extractors, self.samples, view) for view in spec.views])

        def build() -> ReducedFeatures:
            return ReducedFeatures(rows(), reread=rows)  # the map back to raw features only for a refit

        return self.run.memory.get(probe_rows_key(spec) + (len(self.samples),), build)

    def rows(self, samples: Sequence, spec: FeatureSpec) -> list[list[int]]:
        """Per view, the rows of ``samples`` (view v of image i is row ``v * n + i``)."""
        base = [self.row[str(s.path)] for s in samples]
        n = len(self.samples)
        return [[v * n + r for r in base] for v in range(len(spec.views))]


@dataclass
class ProbeCV:
    """What one probe trial measured: per penalty, the fold scores and out-of-fold probabilities."""

    lambdas: tuple[float, ...]
    fold_scores: list[list[float]]  # [penalty][fold]
    fold_accuracy: list[list[float]]  # [penalty][fold] (the headline estimate is of accuracy)
    fold_losses: list[list[float]]
    oof: list[np.ndarray]  # [penalty] (n_scored, K) probabilities, averaged over partitions
    oof_loss: list[float]  # [penalty] mean out-of-fold log loss
    chosen: int  # index of the penalty the trial keeps
    n_train: list[int]  # training rows (images) per fold
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> list[float]:
        return self.fold_scores[self.chosen]

    @property
    def lam(self) -> float:
        return self.lambdas[self.chosen]


def _view_probs(logits: torch.Tensor, problem: int, rows: list[list[int]]) -> torch.Tensor:
    """Problem ``problem``'s probabilities of the images whose rows in each view are ``rows``, averaged
    over the views (flip test-time augmentation); ``logits`` ``(N, ..., B, K)`` of every row (any
    dimensions between, e.g. penalties, are kept)."""
    probs = [torch.softmax(logits[torch.as_tensor(r, dtype=torch.long)][..., problem, :].double(), dim=-1) for r in rows]
    return sum(probs) / len(probs)


def fold_training(objective, params: dict[str, Any], setup) -> tuple[list[list], list[StrategyContext]]:
    """Each fold's training images after the trial's strategies (dropout), and the contexts."""
    train_sets, contexts = [], []
    for fold in objective.selection.folds:
        paths = {s.path for s in fold.train}  # a self-decided fold's decision part is its training part
        samples = list(fold.train) + [s for s in fold.decide if s.path not in paths]
        ctx = StrategyContext(objective.index, setup.source, setup.extractor, objective.run_dir, setup.config,
                              samples, options=dict(objective.options), final=False,
                              reference=list(fold.decide), reference_name="fold's decision part",
                              candidates=list(objective.candidates), memory=objective.run.memory)
        apply_strategies(ctx, params)
        train_sets.append(list(ctx.train_samples))
        contexts.append(ctx)
    return train_sets, contexts


@dataclass
class ProbePath:
    """What the folds measured along the penalty path: everything of a ``ProbeCV`` that the trial's
    penalty rule does not decide."""

    fold_scores: list[list[float]]
    fold_accuracy: list[list[float]]
    fold_losses: list[list[float]]
    oof: list[np.ndarray]
    oof_loss: list[float]

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.oof)


PATHS_KEPT = 64  # measured paths a run keeps (a few hundred kB each)


def _rows_digest(train_rows: Sequence[Sequence[int]]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for rows in train_rows:
        digest.update(np.asarray(rows, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def cross_validate_probe(objective, params: dict[str, Any], setup, *, lambdas: Sequence[float] = LAMBDAS) -> ProbeCV:
    """Every fold of the probe trial at once (module docstring).

    Two trials whose folds train on the same rows of the same features (they differ only in how the
    penalty is chosen, or their dropout dropped the same images) measure the same path: the second
    reads the first's (``probe-paths`` in the run's memory)."""
    train_sets, contexts = fold_training(objective, params, setup)
    spec = contexts[0].features or FeatureSpec((setup.source.label,))
    table = objective.probe_table()
    train_rows = [sum(table.rows(samples, spec), []) for samples in train_sets]
    n_classes = len(objective.index.classes)
    key = probe_rows_key(spec) + (len(table.samples), n_classes, tuple(float(v) for v in lambdas),
                                  _rows_digest(train_rows), objective.base.objective)
    path = objective.run.memory.part("probe-paths", PATHS_KEPT).get(
        key, lambda: _measure_path(objective, table, spec, train_rows, lambdas))
    rule = contexts[0].choose_penalty
    chosen = (int(np.argmin(path.oof_loss)) if rule is None
              else int(rule(tuple(lambdas), path.fold_losses, path.oof_loss, k=objective.selection.k)))
    notes = {name: note for ctx in contexts[:1] for name, note in ctx.notes.items()}
    return ProbeCV(tuple(float(v) for v in lambdas), path.fold_scores, path.fold_accuracy, path.fold_losses, path.oof,
                   path.oof_loss, chosen, [len(s) for s in train_sets], notes)


def _measure_path(objective, table: ProbeTable, spec: FeatureSpec, train_rows: list[list[int]],
                  lambdas: Sequence[float]) -> ProbePath:
    """Solve every fold along the path and score every penalty."""
    features = table.features(spec)
    folds = objective.selection.folds
    n_classes = len(objective.index.classes)
    solution = features.solve(train_rows, table.labels.repeat(len(spec.views)), n_classes, lambdas)
    objective.run.memory.counts["probe paths solved"] += 1
    score_rows = [table.rows(f.score, spec) for f in folds]
    metric = objective.base.objective
    n_paths = len(lambdas)
    logits = torch.stack([features.logits(solution.theta[li]) for li in range(n_paths)], dim=1)  # (N, L, B, K)
    oof = OutOfFold(objective.selection, n_classes, paths=n_paths)
    fold_scores, fold_accuracy, fold_losses = ([[0.0] * len(folds) for _ in range(n_paths)] for _ in range(3))
    for fi, fold in enumerate(folds):
        probs = _view_probs(logits, fi, score_rows[fi])  # (m, L, K): every penalty at once
        y = torch.tensor([s.label for s in fold.score], dtype=torch.long)
        logp = torch.log(probs.clamp_min(1e-12)).float()
        for li in range(n_paths):
            m = classification_metrics(logp[:, li], y, n_classes)
            fold_scores[li][fi], fold_accuracy[li][fi], fold_losses[li][fi] = m[metric], m["accuracy"], m["loss"]
        oof.add_probs(fold.score, probs.transpose(0, 1))
    oofs = list(oof.probs())
    scored_labels = np.array([s.label for s in objective.selection.scored_samples])
    oof_losses = [float(-np.log(np.clip(p[np.arange(len(scored_labels)), scored_labels], 1e-6, 1.0)).mean()) for p in oofs]
    return ProbePath(fold_scores, fold_accuracy, fold_losses, oofs, oof_losses)


def summary_attrs(cv: ProbeCV, selection, objective_name: str) -> dict[str, Any]:
    """The trial's user attributes (the same keys a trained trial stores, plus the penalty path)."""
    scores = cv.scores
    value = statistics.fmean(scores)
    return {
        "value_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "value_se": selection.standard_error(scores),
        "n_folds": len(scores), "fold_scores": scores, "probe": True,
        "lambda": cv.lam, "fold_accuracy": cv.fold_accuracy[cv.chosen],
        # one attribute: each is a storage transaction, and a probe trial takes a fraction of a second
        "penalty_path": {"lambdas": list(cv.lambdas), "fold_scores": cv.fold_scores, "fold_accuracy": cv.fold_accuracy,
                         "oof_loss": [round(v, 5) for v in cv.oof_loss]},
        "n_train": int(statistics.fmean(cv.n_train)),
        "accuracy" if objective_name == "accuracy" else "macro_f1": value,
    }


BAG_INNER_FOLDS = 5


def compare_bagging(objective, params: dict[str, Any], setup, lam: float) -> dict[str, Any]:
    """Does shipping the fold models averaged (a bag) lose to one model refitted on all images?

    Nested, so that the comparison decides nothing it is scored on: within each outer fold, the bag
    of models trained on inner folds of its training images against one model trained on all of them,
    both scored on the outer fold's scoring part (out-of-fold log loss and accuracy over all folds).
    That mirrors the choice the refit faces (the bag of the k fold models vs the refit on everything)
    one level down. A probe trial is a fraction of a second, so the k x k problems cost little."""
    from ..search._folds import stratified_folds

    train_sets, contexts = fold_training(objective, params, setup)
    spec = contexts[0].features or FeatureSpec((setup.source.label,))
    table = objective.probe_table()
    features = table.features(spec)
    folds = objective.selection.folds
    rng = np.random.default_rng([objective.run.seed, 0xBA6])
    problems, owner = [], []  # (rows) per problem; owner: (outer fold, inner index or -1 for the single model)
    for fi, samples in enumerate(train_sets):
        problems.append(sum(table.rows(samples, spec), []))
        owner.append((fi, -1))
        k = max(2, min(BAG_INNER_FOLDS, min(np.bincount([s.label for s in samples]))))
        parts = stratified_folds(samples, k, rng)
        for j in range(k):
            inner = [s for i, part in enumerate(parts) if i != j for s in part]
            problems.append(sum(table.rows(inner, spec), []))
            owner.append((fi, j))
    n = max(1, statistics.fmean(len(x) for x in problems))
    solution = features.solve(problems, table.labels.repeat(len(spec.views)), len(objective.index.classes), [lam])
    logits = features.logits(solution.theta[0])
    single_p, bag_p, y_all = [], [], []
    for fi, fold in enumerate(folds):
        score_rows = table.rows(fold.score, spec)
        members = [pi for pi, (f, j) in enumerate(owner) if f == fi]
        probs = {owner[pi][1]: _view_probs(logits, pi, score_rows) for pi in members}
        single_p.append(probs.pop(-1))
        bag_p.append(torch.stack(list(probs.values())).mean(0))
        y_all += [s.label for s in fold.score]
    y = torch.tensor(y_all)

    def measure(ps):
        p = torch.cat(ps)
        return {"log_loss": round(float(-torch.log(p[torch.arange(len(y)), y].clamp_min(1e-6)).mean()), 5),
                "accuracy": round(float((p.argmax(1) == y).double().mean()), 5)}

    single, bag = measure(single_p), measure(bag_p)
    use = bag["log_loss"] <= single["log_loss"] and bag["accuracy"] >= single["accuracy"]
    return {"single_refit": single, "bag": bag, "use_bag": bool(use), "mean_training_rows": round(n, 1),
            "rule": "nested: inner-fold bag vs one model on each outer fold's training images, scored on the outer "
                    "fold; the bag ships when it loses on neither out-of-fold log loss nor accuracy"}


def refit_probe(objective, params: dict[str, Any], setup, lam: float, n_fold_train: float, samples: Sequence,
                *, bag: bool = False):
    """(``Fitted``, strategy notes) of the probe ``params`` describes. With ``bag``, the fold models of
    the trial's own cross-validation (the same training images, the same penalty) averaged; otherwise
    one model on ``samples`` (all labelled images), with the trial's penalty kept per image as the folds
    used it: the same C, in scikit-learn's terms (lambda scaled by the folds' training size over the
    refit's)."""
    from ..fitted import fitted_probe
    from ..probe import ProbeModel

    if bag:
        train_sets, contexts = fold_training(objective, params, setup)
        spec = contexts[0].features or FeatureSpec((setup.source.label,))
        table = objective.probe_table()
        features = table.features(spec)
        solution = features.solve([sum(table.rows(t, spec), []) for t in train_sets], table.labels.repeat(len(spec.views)),
                                  len(objective.index.classes), [float(lam)])
        weight, bias = features.head(solution.theta[0])  # (F, d, K), (F, K)
        notes = {name: note for name, note in contexts[0].notes.items()}
        model = ProbeModel(spec, weight, bias, float(lam), int(statistics.fmean(len(t) for t in train_sets)))
        notes["probe"] = {"l2": float(lam), "bagged_fold_models": len(train_sets), "n_train": model.n_train,
                          "features": spec.to_json()}
        return fitted_probe(model, objective.run.extractors, setup.source), notes

    ctx = StrategyContext(objective.index, setup.source, setup.extractor, objective.run_dir, setup.config, list(samples),
                          options=dict(objective.options), final=True, candidates=list(objective.candidates),
                          memory=objective.run.memory)
    apply_strategies(ctx, params)
    spec = ctx.features or FeatureSpec((setup.source.label,))
    table = objective.probe_table()
    features = table.features(spec)
    n = len(ctx.train_samples)
    refit_lam = float(lam) * float(n_fold_train) / max(1, n)
    solution = features.solve([sum(table.rows(ctx.train_samples, spec), [])], table.labels.repeat(len(spec.views)),
                              len(objective.index.classes), [refit_lam])
    weight, bias = features.head(solution.theta[0])
    model = ProbeModel(spec, weight, bias, refit_lam, n)
    ctx.notes["probe"] = {"l2": refit_lam, "l2_in_folds": float(lam), "n_train": n, "features": spec.to_json()}
    return fitted_probe(model, objective.run.extractors, setup.source), ctx.notes


def val_is_cleaner(run, *, z: float = 2.0) -> dict[str, Any]:
    """Whether a given ``val/`` folder is better labelled than ``train/``, so that only it should score
    trials (``val-cv``); otherwise the folds draw on every labelled image, several times as many to
    rank trials on.

    The test: a plain probe on the top-ranked model's features, cross-validated over all labelled
    images (5 folds, the strongest penalty of a short path chosen by out-of-fold log loss); a
    ``train/`` with wrong labels disagrees with its own out-of-fold predictions far more often than
    ``val/`` does. ``val/`` is kept apart when its out-of-fold accuracy exceeds ``train/``'s by more
    than ``z`` standard errors of the difference. Reads labels and features only, and decides only
    which images score: no trial sees it."""
    from ._folds import stratified_folds

    train, val = list(run.index.train), list(run.index.val)
    samples = train + val
    ex = run.extractors[run.labels[0]]
    x = ex.extract(samples, description="train features").pooled
    labels = torch.tensor([s.label for s in samples])
    k = int(max(2, min(5, int(np.bincount(labels.numpy()).min()))))
    parts = stratified_folds(samples, k, np.random.default_rng([run.seed, 0xC1EA]))
    row = {str(s.path): i for i, s in enumerate(samples)}
    folds = [[row[str(s.path)] for s in p] for p in parts]
    reduced = ReducedFeatures(x)
    problems = [[r for j, f in enumerate(folds) if j != i for r in f] for i in range(k)]
    solution = reduced.solve(problems, labels, len(run.index.classes), (1.0, 0.1, 0.01))
    best = None
    for li in range(len(solution.lambdas)):
        logits = reduced.logits(solution.theta[li])
        pred = torch.empty(len(samples), dtype=torch.long)
        loss = 0.0
        for i, f in enumerate(folds):
            idx = torch.tensor(f, dtype=torch.long)
            logp = torch.log_softmax(logits[idx, i].double(), -1)
            pred[idx] = logp.argmax(-1)
            loss -= float(logp[torch.arange(len(idx)), labels[idx]].sum())
        if best is None or loss < best[0]:
            best = (loss, pred)
    right = (best[1] == labels).double()
    n_t, n_v = len(train), len(val)
    acc_t, acc_v = float(right[:n_t].mean()), float(right[n_t:].mean())
    se = math.sqrt(max(acc_t * (1 - acc_t), 1e-4) / n_t + max(acc_v * (1 - acc_v), 1e-4) / n_v)
    cleaner = acc_v - acc_t > z * se
    return {"val_cleaner": bool(cleaner), "train_oof_accuracy": round(acc_t, 4), "val_oof_accuracy": round(acc_v, 4),
            "standard_error": round(se, 4), "z": z,
            "decision": ("val/ scores trials alone: its labels agree with a cross-validated probe clearly more often "
                         "than train/'s" if cleaner else
                         "every labelled image scores trials: val/'s labels are no cleaner than train/'s")}
