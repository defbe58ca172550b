"""One headline estimate of the shipped model's accuracy on new images, with an interval.

Which figure, in order of preference:

1. **held out**: a ``test/`` split the run never used for a decision — its accuracy, with a Wilson
   score interval (a binomial proportion on that many images);
2. **cross-validated, corrected for the choice**: after a search, the selected trial's mean accuracy
   over the scoring folds is the maximum (near enough) over many configurations measured on the same
   images, so it is biased upward. Tibshirani & Tibshirani (2009, "A bias correction for the minimum
   error rate in cross-validation") estimate that bias from the per-fold scores alone: on each fold,
   how far the best configuration *on that fold* is above the selected one, averaged over folds. Every
   configuration the search scored counts — each trial, and each penalty of a probe trial's path,
   since that choice was made on the same folds too. The interval is the selected trial's standard
   error (fold spread or binomial error on the scored images, the larger) around the corrected value;
3. **validation**: ``--no-search`` (no test split) — the val accuracy, which early stopping also
   read, with a Wilson interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

Z95 = 1.959964


def fold_spread_se(values: Sequence[float], k: int) -> float:
    """Standard error of a mean over the folds of ``k``-fold partitions from their spread: repeated
    partitions reuse the same images, so the spread is divided by sqrt(k), not by the square root of
    the number of folds."""
    return statistics.stdev(values) / math.sqrt(k) if len(values) > 1 else 0.0


@dataclass
class Estimate:
    """``accuracy`` with ``low``/``high`` (95 %), ``kind`` (held-out | cross-validated | validation)
    and ``method`` in words; the card's and ``fit --json``'s ``estimate``."""

    accuracy: float
    low: float
    high: float
    kind: str
    method: str
    n_images: int
    details: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("accuracy", "low", "high"):
            d[k] = round(float(d[k]), 4)
        return d

    def line(self) -> str:
        return (f"{100 * self.accuracy:.1f} % (95 % interval {100 * self.low:.1f}–{100 * self.high:.1f} %, "
                f"{self.kind}, {self.n_images} images)")


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (``(0, 1)`` for ``n = 0``)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def held_out(accuracy: float, n: int, *, kind: str = "held-out", method: str) -> Estimate:
    low, high = wilson_interval(accuracy * n, n)
    return Estimate(float(accuracy), low, high, kind, method, int(n))


def selection_bias(selected: Sequence[float], configurations: Sequence[Sequence[float]]) -> float:
    """Tibshirani & Tibshirani's bias of the selected configuration's mean fold score: the mean over
    folds of (best score on that fold over ``configurations``) - (the selected one's score there).
    Configurations scored on fewer folds (pruned) are left out."""
    k = len(selected)
    full = [c for c in configurations if len(c) == k]
    if not k or not full:
        return 0.0
    return statistics.fmean(max(max(c[j] for c in full), selected[j]) - selected[j] for j in range(k))


def corrected_cv(selected: Sequence[float], configurations: Sequence[Sequence[float]], se: float, n_scored: int,
                 *, extra: dict[str, Any] | None = None) -> Estimate:
    """The cross-validated estimate of the selected configuration, corrected for the choice (module docstring)."""
    raw = statistics.fmean(selected)
    bias = selection_bias(selected, configurations)
    value = min(1.0, max(0.0, raw - bias))
    half = Z95 * max(0.0, se)
    return Estimate(value, max(0.0, value - half), min(1.0, value + half), "cross-validated",
                    "mean over the scoring folds of the selected trial, minus the optimism of choosing it among "
                    f"{len(configurations)} configurations scored on the same folds (Tibshirani & Tibshirani 2009); "
                    "interval: ±1.96 standard errors (fold spread or binomial error on the scored images, the larger)",
                    int(n_scored), {"raw_mean": round(raw, 4), "bias": round(bias, 4), "standard_error": round(se, 4),
                                    "n_folds": len(selected), **(extra or {})})
