"""One candidate's scores: ``ScoreRow`` (the ranking, text and DATL files read it; the report holds the rows)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


@dataclass
class ScoreRow:
    """Every number ``autotl score`` knows about one candidate source model."""

    label: str
    spec: str
    weights_origin: str
    input_size: int
    params: int
    num_source_classes: int
    feature_dim: int
    n_images: int
    feature_pass_s: float  # wall time of the (single) feature pass; ~0 when it came from the cache
    forward_batches: int  # batches this call pushed through the backbone (0 = cache hit)
    metrics_s: float  # wall time of DATL + LogME + LEEP + H-score on the cached arrays
    scores: dict[str, float]  # METRICS -> value (NaN: not available, e.g. no source head)
    datl: dict[str, Any] | None = None  # score_name, score, top_mass_10, prior, top_classes
    notes: list[str] = field(default_factory=list)
    mean_rank: float = float("nan")
    rank: int = 0
    # not serialised: what fit reuses
    source: Any = field(default=None, repr=False, compare=False)
    extractor: Any = field(default=None, repr=False, compare=False)
    weights: Any = field(default=None, repr=False, compare=False)  # transferability.DatlWeights
    class_names: list[str] | None = field(default=None, repr=False, compare=False)

    @property
    def cached(self) -> bool:
        return self.forward_batches == 0

    @property
    def seconds(self) -> float:
        return self.feature_pass_s + self.metrics_s

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "model": self.label,
            "spec": self.spec,
            "weights_origin": self.weights_origin,
            "input_size": self.input_size,
            "params": self.params,
            "num_source_classes": self.num_source_classes,
            "feature_dim": self.feature_dim,
            "n_images": self.n_images,
            "feature_pass_s": round(self.feature_pass_s, 3),
            "forward_batches": self.forward_batches,
            "cached": self.cached,
            "metrics_s": round(self.metrics_s, 3),
            "scores": {k: _finite_or_none(v) for k, v in self.scores.items()},
            "mean_rank": _finite_or_none(self.mean_rank),
            "datl": self.datl,
            "notes": list(self.notes),
        }
