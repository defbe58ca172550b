"""Which training images to drop, given influence scores (positive = harmful).

The paper's Algorithm A drops every image with a positive score.  That is ``tau = 0`` here; larger
``tau`` drops only images that stand out, measured in a scale-free unit so one ``tau`` means the same
thing for any dataset, backbone or validation-set size (influence scores scale with all of them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["DropoutReport", "robust_spread", "select_dropout"]

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal sample -> its standard deviation


@dataclass(frozen=True)
class DropoutReport:
    """What ``select_dropout`` did.

    ``threshold``: images with ``score > threshold`` were candidates (``inf`` = no dropout; always
    >= 0, because an image predicted to help is never dropped).  ``spread``: the robust spread used
    by mode ``"spread"``.  ``restored_by_guard``: candidates kept anyway so that every class keeps at
    least ``max(1, ceil(min_keep_fraction * n_class))`` images; ``guarded_classes`` lists those classes.
    """

    mode: str
    tau: float | None
    n_total: int
    n_dropped: int
    threshold: float
    spread: float
    dropped_per_class: dict[int, int] = field(default_factory=dict)
    restored_by_guard: int = 0
    guarded_classes: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["dropped_per_class"] = {str(k): v for k, v in self.dropped_per_class.items()}
        d["guarded_classes"] = list(self.guarded_classes)
        for key in ("tau", "threshold", "spread"):  # JSON has no inf
            if d[key] is not None and not math.isfinite(d[key]):
                d[key] = None if key != "threshold" else "inf"
        return d


def robust_spread(scores) -> float:
    """``1.4826 * median(|s - median(s)|)``: a standard deviation that ignores the harmful tail.

    Falls back to ``1.2533 * mean(|s - median(s)|)`` when more than half the scores are tied (MAD 0);
    0 only when all scores are equal.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return 0.0
    dev = np.abs(s - np.median(s))
    spread = MAD_TO_SIGMA * float(np.median(dev))
    if spread == 0.0:
        spread = math.sqrt(math.pi / 2.0) * float(dev.mean())
    return spread


def select_dropout(
    scores,
    tau: float | None,
    *,
    mode: str = "spread",
    labels=None,
    min_keep_fraction: float = 0.1,
) -> tuple[np.ndarray, DropoutReport]:
    """Return ``(keep, report)``: a boolean keep-mask over the training images and what was dropped.

    ``scores``: influence scores (``InfluenceResult.scores``), positive = removing the image is
    predicted to lower the validation loss.

    Modes (both scale-free: multiplying all scores by a positive constant gives the same mask):

    - ``"spread"``: drop images with ``score > tau * robust_spread(scores)`` **and** ``score > 0``.
      ``tau = 0`` is the paper's rule (drop every harmful image); ``tau = 3`` drops only outliers.
    - ``"fraction"``: drop the ``floor(tau * n_positive)`` highest-scoring of the ``n_positive``
      images with ``score > 0`` (``tau`` in [0, 1]).

    ``tau = None`` or ``inf``: no dropout.

    Class guard: no class (per ``labels``; all images count as one class when ``labels`` is None) is
    left with fewer than ``max(1, ceil(min_keep_fraction * n_class))`` images.  When the rule would cut
    deeper, the least harmful (lowest-score) candidates of that class are kept instead.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    if not np.isfinite(s).all():
        raise ValueError("influence scores contain NaN or inf")
    if mode not in ("spread", "fraction"):
        raise ValueError(f"mode must be 'spread' or 'fraction', got {mode!r}")
    if not 0.0 <= min_keep_fraction <= 1.0:
        raise ValueError(f"min_keep_fraction must lie in [0, 1], got {min_keep_fraction}")
    if labels is None:
        y = np.zeros(n, dtype=np.int64)
    else:
        y = np.asarray(labels).reshape(-1)
        if y.size != n:
            raise ValueError(f"labels has {y.size} entries for {n} scores")
        y = y.astype(np.int64)
    classes = np.unique(y)
    spread = robust_spread(s)

    keep = np.ones(n, dtype=bool)
    no_dropout = tau is None or float(tau) == math.inf
    if no_dropout or n == 0:
        threshold = math.inf
    else:
        tau = float(tau)
        if not tau >= 0.0:
            raise ValueError(f"tau must be >= 0 (or None for no dropout), got {tau}")
        if mode == "spread":
            threshold = max(tau * spread, 0.0)
            if tau > 0 and spread == 0.0:  # all scores equal: nothing stands out
                threshold = math.inf
            keep = ~(s > threshold)
        else:
            if tau > 1.0:
                raise ValueError(f"tau is a fraction in mode 'fraction', got {tau}")
            positive = np.flatnonzero(s > 0)
            n_drop = int(math.floor(tau * positive.size + 1e-9))
            if n_drop == 0:
                threshold = math.inf
            else:
                order = positive[np.argsort(-s[positive], kind="stable")]
                drop = order[:n_drop]
                keep[drop] = False
                threshold = float(s[drop].min())

    # class guard: restore the least harmful candidates of classes cut too deep (loop over classes)
    restored = 0
    guarded: list[int] = []
    for c in classes:
        members = np.flatnonzero(y == c)
        min_keep = max(1, math.ceil(min_keep_fraction * members.size - 1e-9))
        missing = min_keep - int(keep[members].sum())
        if missing > 0:
            dropped = members[~keep[members]]
            back = dropped[np.argsort(s[dropped], kind="stable")[:missing]]
            keep[back] = True
            restored += back.size
            guarded.append(int(c))

    dropped_per_class = {int(c): int((~keep[y == c]).sum()) for c in classes}
    report = DropoutReport(
        mode=mode,
        tau=None if tau is None else float(tau),
        n_total=n,
        n_dropped=int((~keep).sum()),
        threshold=float(threshold),
        spread=float(spread),
        dropped_per_class=dropped_per_class,
        restored_by_guard=restored,
        guarded_classes=tuple(guarded),
    )
    return keep, report
