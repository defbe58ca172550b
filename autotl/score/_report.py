"""What scoring found: one ``ScoreRow`` per candidate, the ranked ``ScoreReport`` and its JSON."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..errors import AutotlError
from ._datl_files import datl_weights_file, save_datl_weights
from ._rules import DEFAULT_RULE, RULES, rank_rows
from ._text import SCORED_SPLIT_NOTE, TOP_CLASSES, looks_like_lines, score_table

SCORING_FILE = "scoring.json"


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
    weights: Any = field(default=None, repr=False, compare=False)  # scoring.DatlWeights
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


@dataclass
class ScoreReport:
    """Scores of every candidate, best first by ``rule``."""

    rows: list[ScoreRow]
    rule: str
    data: dict[str, Any]
    seconds: float
    run_dir: Path | None = None

    def ranking(self) -> list[str]:
        """Model labels, best first."""
        return [r.label for r in self.rows]

    def top_k(self, k: int) -> list[ScoreRow]:
        """The ``k`` best rows (each has ``.source`` and ``.extractor`` for training)."""
        if int(k) < 1:
            raise AutotlError(f"--top-k {k}: keep at least one source model (k >= 1)")
        return self.rows[: int(k)]

    def row(self, label: str) -> ScoreRow:
        for r in self.rows:
            if r.label == label:
                return r
        raise KeyError(f"no scored model {label!r}; scored: {', '.join(self.ranking())}")

    def rerank(self, rule: str) -> "ScoreReport":
        """The same scores ordered by another rule (no recomputation)."""
        self.rows = rank_rows(self.rows, rule)
        self.rule = rule
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": {"name": self.rule, "metrics": list(RULES[self.rule]), "default": DEFAULT_RULE,
                     "how": "models ordered by their mean rank across the rule's metrics (1 = best)"},
            "data": dict(self.data),
            "note": SCORED_SPLIT_NOTE,
            "metrics": {
                "datl": "KL(P_t || P_s) in nats; P_t = mean source-head softmax over the target training images, "
                        "P_s = source label prior; w(y) = P_t(y) / P_s(y) saved in datl/<model>.npz",
                "logme": "LogME log evidence per sample on pooled penultimate features (You et al. 2021)",
                "leep": "LEEP from source-head probabilities (Nguyen et al. 2020)",
                "hscore": "shrinkage H-score with Ledoit-Wolf covariance (Ibrahim et al. 2022)",
            },
            "ranking": self.ranking(),
            "models": [r.to_json() for r in self.rows],
            "seconds": round(self.seconds, 3),
        }

    def table(self):
        """A rich table (model, input size, params, feature-pass time, scores, rank); the DATL top
        classes are in ``looks_like_lines()``."""
        return score_table(self)

    def looks_like_lines(self, k: int = TOP_CLASSES) -> list[str]:
        """Per model: 'MODEL: your images look like: tabby (w=123), Egyptian cat (w=80), ...'."""
        return looks_like_lines(self, k)

    def save(self, run_dir: str | os.PathLike) -> Path:
        """Write ``datl/<model>.npz`` (p_t, p_s, w, class_names) per model, then ``scoring.json``."""
        run_dir = Path(run_dir)
        for r in self.rows:
            if r.weights is not None:
                save_datl_weights(run_dir, r)
        doc = self.to_json()
        for m in doc["models"]:
            if m["datl"] is not None:
                m["datl"]["weights_file"] = datl_weights_file(m["model"])
        out = atomic_write_json(run_dir / SCORING_FILE, doc)
        self.run_dir = run_dir
        return out
