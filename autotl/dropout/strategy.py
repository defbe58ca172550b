"""Influence-based data dropout as a transfer strategy (``dropout_tau``, ``dropout_mode``).

Before a trial trains, ``DataDropout.apply``:

1. takes the pooled frozen-backbone features of the trial's training samples and of the
   validation split from ``ctx.extractor`` (one cached forward pass for the whole run; the same
   pass also computes the prefix activations the trial's training will read, when it caches them);
2. fits the convex softmax head on the (centred, scaled) training features and scores every
   training image by the predicted reduction of the total validation loss if it were removed
   (``influence_scores``; reference = ``ctx.reference`` — a cross-validation fold's decision part, or the
   val split —, or only its images of
   ``ctx.options["focus_class"]``);
3. drops the images scoring above ``tau`` robust spreads (or the top ``tau`` fraction of the
   harmful ones, ``dropout_mode="fraction"``) and hands the kept samples to training.

The scores do not depend on ``tau``: they are kept in the run's memory (``ctx.memory``, bounded) per
(features, labels, l2, focus class), so the trials of a search that vary ``tau`` pay for one head fit
and one solve.  The test
split is never read.  On the final refit (``ctx.final``) ``dropped.csv`` and ``influence.csv`` are
written to the run folder.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .._console import log
from .._memory import BoundedMemory
from ..errors import AutotlError
from ..options import DROPOUT_INFLUENCES, DROPOUT_L2, DropoutOptions, parse_tau
from ..probe import GRAM_RTOL
from ..strategy import BaseStrategy, StrategyContext
from .influence import InfluenceResult, LinearHead, fit_logistic_head, influence_scores
from .selection import DropoutReport, select_dropout

__all__ = [
    "DEFAULT_L2",
    "DECIDED_BY",
    "PAPER_RULE",
    "threshold_rule",
    "DataDropout",
    "DropoutDecision",
    "INFLUENCES",
    "InfluenceOutcome",
    "compute_block_influence",
    "compute_influence",
    "parse_tau",
    "resolve_focus_class",
    "cache_stats",
]

DEFAULT_L2 = DROPOUT_L2
DEFAULT_MODE = DropoutOptions.dropout_mode
INFLUENCES = DROPOUT_INFLUENCES
DECIDED_BY = "val split (influence reference)"
# influence outcomes (and heads) a run keeps, so that trials that differ only in tau hit them: every
# fold of every candidate model (a trial asks for all its folds in turn, and a least-recently-used
# memory smaller than that cycle would miss on every one); a few hundred KB at most
_KEPT = 64


@dataclass(frozen=True, eq=False)
class InfluenceOutcome:
    """The convex head and the influence of every training image on the reference loss."""

    result: InfluenceResult
    head: LinearHead
    l2: float
    fit_seconds: float
    influence_seconds: float
    key: str
    head_key: str = ""
    cached: bool = False  # True when returned from the in-memory cache

    @property
    def scores(self) -> np.ndarray:
        return self.result.scores

    @property
    def seconds(self) -> float:
        """Head fit + influence solve (the cost a cache hit saves)."""
        return self.fit_seconds + self.influence_seconds

    @property
    def nbytes(self) -> int:
        r = self.result
        return int(r.scores.nbytes + r.predicted.nbytes + r.prob_given.nbytes + self.head.W.nbytes + self.head.b.nbytes)

    def hit(self) -> "InfluenceOutcome":
        """This outcome as served from memory (``cached``)."""
        return InfluenceOutcome(self.result, self.head, self.l2, self.fit_seconds, self.influence_seconds, self.key,
                                self.head_key, cached=True)


def _outcomes(memory: BoundedMemory) -> BoundedMemory:
    return memory.part("dropout-influence", _KEPT)


def cache_stats(memory: BoundedMemory) -> dict[str, int]:
    """Head fits, influence solves and memory hits of data dropout in ``memory`` (a run's)."""
    counts = _outcomes(memory).counts
    return {k: int(counts[k]) for k in ("head_fits", "influence_solves", "cache_hits")}


def _served(kept: BoundedMemory, memory: BoundedMemory, key, make) -> InfluenceOutcome:
    """``make()``'s outcome once per ``key`` in ``kept``; a later request gets it marked ``cached`` and is
    counted among ``memory``'s cache hits."""
    if key in kept:
        _outcomes(memory).counts["cache_hits"] += 1
        return kept.get(key, make).hit()
    return kept.get(key, make)


def _remembered(memory: BoundedMemory | None, key: str, compute) -> InfluenceOutcome:
    """``compute()`` once per ``key`` in ``memory`` (every time without one)."""
    if memory is None:
        return compute(None)
    outcomes = _outcomes(memory)
    return _served(outcomes, memory, key, lambda: compute(outcomes))


def _images_digest(samples: Sequence) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(f"{s.path}\t{s.label}" for s in samples).encode())
    return h.hexdigest()


def _by_images(ctx: StrategyContext, settings: tuple, train: Sequence, val: Sequence, compute) -> InfluenceOutcome:
    """``compute()``'s outcome, found in the run's memory by the images it scores and its reference
    before any feature is read: every trial asks again for each fold's influence, and extracting and
    fingerprinting the fold's features to find it costs more than the probe that follows. Within a
    run an extractor gives the same images the same features, so the images, the extractor and the
    settings identify the outcome that ``compute_influence`` would find by its features."""
    if ctx.memory is None:
        return compute()
    source = ctx.extractor.source
    extractor = (source.label, source.input_id, repr(sorted(source.data_config.items())), ctx.extractor.backend)
    key = (extractor, settings, _images_digest(train), _images_digest(val))
    return _served(ctx.memory.part("dropout-by-images", _KEPT), ctx.memory, key, compute)


def _as_array(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(x), dtype=dtype)


def _fingerprint(*parts) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        if isinstance(p, np.ndarray):
            h.update(str((p.shape, p.dtype.str)).encode())
            h.update(memoryview(p).cast("B"))
        else:
            h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _standardise(train_x: np.ndarray, val_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre on the training mean and scale to unit mean squared norm (training statistics only).

    One global scale (not per feature) keeps the geometry of the backbone's features, and makes
    ``l2`` scale-free across backbones.
    """
    mu = train_x.mean(0, dtype=np.float64)
    xc = train_x - mu
    scale = math.sqrt(float(np.mean(np.einsum("ij,ij->i", xc, xc))))
    scale = scale if scale > 0 else 1.0
    return xc / scale, (val_x - mu) / scale


def _span_of_training_rows(train_x: np.ndarray, val_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The features in an orthonormal basis of the training rows' span, when there are fewer rows than
    features: the same influence scores, from a head with n instead of D weights per class.

    Exact: the penalised optimum's weights lie in that span (representer theorem); there the Hessian is
    the data part plus the damping, on the complement the damping alone, and every training gradient
    lies in the span, so ``g_i^T H^-1 g_val`` only sees the reference gradient's projection — its
    features projected onto the span, which the basis gives. Predictions are unchanged likewise."""
    n, d = train_x.shape
    if n >= d:
        return train_x, val_x
    # through the rows' Gram matrix: an n x n eigenproblem instead of an n x D SVD; with X = U S V^T
    # the training rows are U S and a reference row x is (x X^T) U / S in the basis V
    ev, u = np.linalg.eigh(train_x @ train_x.T)
    keep = ev > GRAM_RTOL * max(float(ev[-1]), 1e-300)
    sv, u = np.sqrt(ev[keep]), u[:, keep]
    return u * sv, ((val_x @ train_x.T) @ u) / sv


def compute_influence(
    train_x,
    train_y,
    val_x,
    val_y,
    num_classes: int,
    *,
    l2: float = DEFAULT_L2,
    focus_class: int | None = None,
    solver: str = "auto",
    memory: BoundedMemory | None = None,
) -> InfluenceOutcome:
    """Fit the convex head on the training features and score every training image.

    ``scores > 0``: removing the image is predicted to lower the total cross-entropy of the
    reference set (all of ``val_*``, or only its ``focus_class`` images).  With ``memory`` (a run's)
    results are kept per (features, labels, l2, focus class, solver), and the head per (features,
    labels, l2) across focus classes.
    """
    x = _as_array(train_x, np.float32)
    y = _as_array(train_y, np.int64).reshape(-1)
    xv = _as_array(val_x, np.float32)
    yv = _as_array(val_y, np.int64).reshape(-1)
    if x.ndim != 2 or xv.ndim != 2 or x.shape[1] != xv.shape[1]:
        raise ValueError(f"train/val features must be (N, D) with the same D, got {x.shape} and {xv.shape}")
    if xv.shape[0] == 0:
        raise AutotlError("data dropout needs validation images as the influence reference; add a val split")
    head_key = _fingerprint("head", x, y, int(num_classes), float(l2))
    key = _fingerprint(head_key, xv, yv, focus_class, solver)

    def compute(outcomes: BoundedMemory | None) -> InfluenceOutcome:
        xs, xvs = _standardise(x.astype(np.float64), xv.astype(np.float64))
        xs, xvs = _span_of_training_rows(xs, xvs)
        timing = {"fit": 0.0}

        def fit() -> LinearHead:
            t0 = time.perf_counter()
            head = fit_logistic_head(xs, y, num_classes, l2=l2)
            timing["fit"] = time.perf_counter() - t0
            if outcomes is not None:
                outcomes.counts["head_fits"] += 1
            return head

        # the head does not depend on the reference set: kept apart, it serves every focus class
        head = fit() if memory is None else memory.part("dropout-heads", _KEPT).get(head_key, fit)
        result = influence_scores(head, xs, y, xvs, yv, solver=solver, focus_class=focus_class)
        if outcomes is not None:
            outcomes.counts["influence_solves"] += 1
        return InfluenceOutcome(result, head, float(l2), timing["fit"], result.seconds, key, head_key)

    return _remembered(memory, key, compute)


def _last_block_cut(ctx: StrategyContext) -> int | None:
    """The cut in front of the network's last stage when the trial trains it, else None."""
    from ..stages import resolve_frozen

    n_stages = ctx.extractor.num_stages
    return n_stages - 1 if resolve_frozen(ctx.config.frozen_stages, n_stages) < n_stages else None


# Block influence on CPU: one pass of EfficientNet-Lite0's last stage over 2,000 images at 224 px is
# ~2 s on 2 cores, a Hessian-vector product ~5 passes; these bounds keep the step to minutes. The
# notes report the gradient norm and CG residual reached.
BLOCK_FIT_ITER = 10
BLOCK_CG_ITER = 20
BLOCK_CG_TOL = 1e-2


def compute_block_influence(source, cut: int, train_a, train_y, val_a, val_y, num_classes: int, *,
                            l2: float = DEFAULT_L2, focus_class: int | None = None, memory: BoundedMemory | None = None,
                            fit_max_iter: int = BLOCK_FIT_ITER, cg_max_iter: int = BLOCK_CG_ITER,
                            cg_tol: float = BLOCK_CG_TOL) -> InfluenceOutcome:
    """``block_influence_scores`` through stage ``cut`` (the last) of ``source``'s network and the head,
    on the activations at that cut; kept in ``memory`` like ``compute_influence``. Float32, with a
    bounded L-BFGS fit and CG (``BLOCK_*``)."""
    from ..stages import SuffixView, TransferNet
    from .block_influence import block_influence_scores

    a, y = _as_array(train_a, np.float32), _as_array(train_y, np.int64).reshape(-1)
    av, yv = _as_array(val_a, np.float32), _as_array(val_y, np.int64).reshape(-1)
    key = _fingerprint("block", getattr(source, "label", ""), int(cut), a, y, av, yv, int(num_classes), float(l2), focus_class,
                       fit_max_iter, cg_max_iter, cg_tol)

    def compute(outcomes: BoundedMemory | None) -> InfluenceOutcome:
        net = TransferNet.from_source(source.model, int(num_classes), int(cut))
        net.head.requires_grad_(False)  # block_influence_scores brings its own head
        result, model = block_influence_scores(SuffixView(net, int(cut)), torch.from_numpy(a), torch.from_numpy(y),
                                               torch.from_numpy(av), torch.from_numpy(yv), int(num_classes), l2=l2,
                                               focus_class=focus_class, dtype=torch.float32, fit_tol=1e-5,
                                               fit_max_iter=fit_max_iter, cg_tol=cg_tol, cg_max_iter=cg_max_iter)
        if outcomes is not None:
            outcomes.counts["influence_solves"] += 1
        head = LinearHead(W=model.head.weight.detach().double().numpy(), b=model.head.bias.detach().double().numpy(),
                          l2=float(l2), bias_l2=float(l2), grad_norm=result.train_grad_norm, n_train=len(y))
        return InfluenceOutcome(result, head, float(l2), 0.0, result.seconds, key, key)

    return _remembered(memory, key, compute)


def resolve_focus_class(name: Any, classes: Sequence[str]) -> int | None:
    """A class NAME → its index; ``None`` → ``None``; an unknown name → ``AutotlError``."""
    if name is None or (isinstance(name, str) and not name.strip()):
        return None
    text = str(name)
    if text in classes:
        return list(classes).index(text)
    shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
    raise AutotlError(f"--focus-class {text!r}: not a class of this data set; classes are: {shown}")


def _training_cuts(ctx: StrategyContext, n_images: int) -> list[int]:
    """The prefix cut the trial's training will read from the cache, so one pass serves both."""
    from ..stages import resolve_frozen
    from ..train import should_cache

    try:
        n_stages = ctx.extractor.num_stages
        cut = resolve_frozen(ctx.config.frozen_stages, n_stages)
        if cut < n_stages and should_cache(ctx.extractor, n_images, cut, ctx.config.use_cache):
            return [cut]
    except Exception:  # an unusual config or extractor: training computes what it needs itself
        pass
    return []


@dataclass
class DropoutDecision:
    """What data dropout decided for one training set: the images it scored (the training images that
    are not reference images) and their places in it, which of them it keeps, the influence and the
    notes for the card."""

    scored: list  # Sample
    positions: np.ndarray  # (len(scored),) their indices in the training samples
    keep: np.ndarray  # (len(scored),) bool
    report: DropoutReport
    outcome: InfluenceOutcome
    notes: dict[str, Any]


class DataDropout(BaseStrategy):
    """Drop the training images predicted to raise the validation loss (Wang, Huan & Zhu, Alg. A).

    Parameters and run-wide options: ``autotl.options.DropoutOptions`` (``dropout_tau``: ``None``/inf
    = off; mode ``"spread"``: drop ``score > tau * robust_spread``, ``tau = 0`` is the paper's "drop
    every harmful image"; mode ``"fraction"``: drop the top ``tau`` share of the harmful images;
    ``dropout_influence``: ``"head"``, the convex head on frozen features, or ``"block"``: through the
    network's last stage and the head, ``block_influence``, when the trial trains that stage; a
    linear-probe trial has no trainable block and uses the head; ``focus_class``, ``dropout_l2``,
    ``dropout_min_keep`` (the class guard), ``dropout_solver``).
    """

    name = "dropout"
    params = DropoutOptions.params()

    def is_active(self, params: dict[str, Any]) -> bool:
        return parse_tau(params.get("dropout_tau")) is not None

    def describe(self, params: dict[str, Any]) -> str:
        tau = parse_tau(params.get("dropout_tau"))
        if tau is None:
            return "dropout: off"
        mode = params.get("dropout_mode") or DEFAULT_MODE
        unit = " x robust spread" if mode == "spread" else " of harmful images"
        block = " (influence through the last block)" if params.get("dropout_influence") == "block" else ""
        return f"dropout: tau={tau:g}{unit}{block}"

    def decide(self, ctx: StrategyContext, opts: DropoutOptions) -> DropoutDecision | None:
        """Score ``ctx``'s training images by their influence on its reference and select the ones to
        keep at ``opts.dropout_tau`` (``None``: score only, keep all); ``ctx`` is not changed. None
        when every training image is a reference image."""
        opts.check()
        tau, mode = parse_tau(opts.dropout_tau), opts.dropout_mode
        classes = ctx.index.classes
        focus = resolve_focus_class(opts.focus_class, classes)
        samples = list(ctx.train_samples)
        val = list(ctx.reference)  # the influence reference (a fold's decision part, or val); test is never read
        if not val:
            raise AutotlError("data dropout needs validation images as the influence reference; add a val/ folder")
        # validation images that are also trained on (a refit on train+val) are the reference: they
        # are kept and not scored, so the decision is the one made on the train split alone
        val_set = set(val)
        in_val = np.fromiter((s in val_set for s in samples), dtype=bool, count=len(samples))
        train = [s for s, v in zip(samples, in_val) if not v] if in_val.any() else samples
        if not train:
            return None

        influence = str(opts.dropout_influence).lower()
        cuts = _training_cuts(ctx, len(train) + len(val))
        block_cut = _last_block_cut(ctx) if influence == "block" else None
        cuts = sorted({*cuts, *([] if block_cut is None else [block_cut])})

        def from_features() -> InfluenceOutcome:
            tr = ctx.extractor.extract(train, cuts, description="train features")
            va = ctx.extractor.extract(val, cuts, description="val features")
            if block_cut is None:
                return compute_influence(tr.pooled, tr.labels, va.pooled, va.labels, len(classes), l2=float(opts.dropout_l2),
                                         focus_class=focus, solver=str(opts.dropout_solver), memory=ctx.memory)
            n_stages = ctx.extractor.num_stages
            return compute_block_influence(ctx.source, block_cut, tr.at(block_cut, n_stages), tr.labels,
                                           va.at(block_cut, n_stages), va.labels, len(classes),
                                           l2=float(opts.dropout_l2), focus_class=focus, memory=ctx.memory)

        settings = (len(classes), block_cut, tuple(cuts), float(opts.dropout_l2), focus, str(opts.dropout_solver))
        outcome = _by_images(ctx, settings, train, val, from_features)
        min_keep = float(opts.dropout_min_keep)
        keep, report = select_dropout(outcome.result.scores, tau, mode=mode, labels=np.array([s.label for s in train]),
                                      min_keep_fraction=min_keep)
        notes = dropout_notes(report, outcome, classes, tau=tau, mode=mode, focus=focus, n_val=len(val), min_keep=min_keep)
        notes["influence"] = ("convex head on frozen features" if block_cut is None
                              else f"last trainable block (stage {block_cut}) + head: CG with Hessian-vector products")
        if influence == "block" and block_cut is None:
            notes["influence"] += " (block asked; this trial trains no block: linear probe)"
        if in_val.any():
            notes["val_images_trained_on_not_scored"] = int(in_val.sum())
        positions = np.flatnonzero(~in_val) if in_val.any() else np.arange(len(samples))
        return DropoutDecision(train, positions, keep, report, outcome, notes)

    def apply(self, ctx: StrategyContext, params: dict[str, Any]) -> None:
        tau = parse_tau(params.get("dropout_tau"))
        if tau is None:
            return
        decision = self.decide(ctx, DropoutOptions.of(ctx.options, params))
        if decision is None:
            return
        keep = np.ones(len(ctx.train_samples), dtype=bool)  # reference images trained on stay, in their places
        keep[decision.positions] = decision.keep
        ctx.train_samples = [ctx.train_samples[i] for i in np.flatnonzero(keep)]
        notes = ctx.notes[self.name] = decision.notes
        notes["decided_by"] = f"{ctx.reference_name} (influence reference)"
        res, report, classes = decision.outcome.result, decision.report, ctx.index.classes
        focus = notes["focus_class"]
        log(f"data dropout: {report.n_dropped}/{report.n_total} training images dropped "
            f"(tau={tau:g} {notes['mode']}, reference: {res.n_reference} images of the {ctx.reference_name}"
            + (f" of class {focus!r}" if focus is not None else "")
            + (", influence cached" if decision.outcome.cached else f", influence {decision.outcome.seconds:.1f}s") + ")")
        if ctx.final:
            from .report import write_dropout_files

            paths = write_dropout_files(ctx.run_dir, decision.scored, classes, res, decision.keep)
            notes["files"] = {k: str(v) for k, v in paths.items()}


PAPER_RULE = "paper (Algorithm A): drop exactly the images with positive total influence"


def threshold_rule(tau: float, mode: str, restored_by_guard: int = 0) -> str:
    """The drop rule in words, for the card: ``tau = 0`` in mode "spread" is the paper's own threshold
    (exact unless the class guard kept some harmful images, which it then says)."""
    if mode == "spread" and tau == 0:
        if restored_by_guard:
            return (f"{PAPER_RULE}, except {restored_by_guard} kept by the class guard "
                    "(lower dropout_min_keep to guard less)")
        return PAPER_RULE
    if mode == "spread":
        return f"drop images with influence > {tau:g} x robust spread (a stricter threshold than the paper's 0)"
    return f"drop the top {tau:g} share of the images with positive influence"


def dropout_notes(report: DropoutReport, outcome: InfluenceOutcome, classes: Sequence[str], *, tau: float,
                  mode: str, focus: int | None, n_val: int, min_keep: float) -> dict[str, Any]:
    """What the dropout did, for the card, the report and ``--json`` (plain JSON types)."""
    res = outcome.result
    rep = report.to_dict()
    return {
        "tau": tau,
        "mode": mode,
        "threshold_rule": threshold_rule(tau, mode, report.restored_by_guard),
        "threshold": rep["threshold"],
        "spread": rep["spread"],
        "n_total": report.n_total,
        "n_dropped": report.n_dropped,
        "n_kept": report.n_total - report.n_dropped,
        "dropped_per_class": {classes[int(c)]: n for c, n in report.dropped_per_class.items()},
        "n_harmful": int((res.scores > 0).sum()),
        "restored_by_class_guard": report.restored_by_guard,
        "guarded_classes": [classes[c] for c in report.guarded_classes],
        "min_keep_fraction": min_keep,
        "focus_class": None if focus is None else classes[focus],
        "n_reference": res.n_reference,
        "n_val": n_val,
        "l2": outcome.l2,
        "solver": res.solver,
        "cg_iterations": res.cg_iterations,
        "residual": res.residual,
        "head_grad_norm": res.train_grad_norm,
        "seconds": round(outcome.seconds, 4),
        "cached": outcome.cached,
        "decided_by": DECIDED_BY,
    }
