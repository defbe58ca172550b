"""What scoring found: the ranked ``ScoreReport`` of the candidates' ``ScoreRow``s and its JSON."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_write_json
from ..errors import AutotlError
from ._datl_files import datl_weights_file, save_datl_weights
from ._row import ScoreRow
from ._rules import DEFAULT_RULE, RULES, rank_rows
from ._text import SCORED_SPLIT_NOTE, TOP_CLASSES, looks_like_lines, score_table

SCORING_FILE = "scoring.json"


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
        return score_table(self.rows, self.rule, self.data)

    def looks_like_lines(self, k: int = TOP_CLASSES) -> list[str]:
        """Per model: 'MODEL: your images look like: tabby (w=123), Egyptian cat (w=80), ...'."""
        return looks_like_lines(self.rows, k)

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
