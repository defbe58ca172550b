"""Scores for people: the rich ranking table and the "your images look like" lines."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ._rules import METRIC_TITLES, METRICS, RULES

if TYPE_CHECKING:
    from ._row import ScoreRow

TOP_CLASSES = 10  # source classes shown per model ("your images look like: ...")
SCORED_SPLIT_NOTE = "scored on the training split only; validation and test images are never used for scoring"


def short_class_name(name: str) -> str:
    """'tabby, tabby cat' -> 'tabby' (ImageNet descriptions list synonyms)."""
    return str(name).split(",")[0].strip()


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(float(x)):
        return "n/a"
    return f"{float(x):.{digits}f}"


def score_table(rows: Sequence[ScoreRow], rule: str, data: Mapping[str, Any]):
    """A rich table of ``rows`` ranked by ``rule``: rank, model, input size, params, feature-pass time,
    every score, mean rank; ``data`` (image and class counts) goes in the caption."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"source models ranked by '{rule}' ({' + '.join(METRIC_TITLES[m] for m in RULES[rule])})",
              title_justify="left")
    t.add_column("rank", justify="right")
    t.add_column("model", no_wrap=True)
    t.add_column("input", justify="right")
    t.add_column("params", justify="right")
    t.add_column("pass s", justify="right")
    for m in METRICS:
        t.add_column(METRIC_TITLES[m], justify="right")
    t.add_column("mean rank", justify="right")
    for r in rows:
        t.add_row(
            str(r.rank), escape(r.label), str(r.input_size), f"{r.params / 1e6:.2f}M",
            "cached" if r.cached else f"{r.feature_pass_s:.1f}",
            *(_fmt(r.scores.get(m)) for m in METRICS), _fmt(r.mean_rank, 2),
        )
    priors = sorted({r.datl["prior"] for r in rows if r.datl})
    d = data
    t.caption = (f"{SCORED_SPLIT_NOTE} ({d.get('n_images')} images, {d.get('n_classes')} classes). "
                 f"Higher is better for every score. P_s: {'; '.join(priors) or 'n/a'}.")
    t.caption_justify = "left"
    return t


def looks_like_lines(rows: Sequence[ScoreRow], k: int = TOP_CLASSES) -> list[str]:
    """Per model: 'MODEL: your images look like: tabby (w=123), Egyptian cat (w=80), ...'."""
    out = []
    for r in rows:
        if not r.datl:
            out.append(f"{r.label}: no source classifier, no DATL weights")
            continue
        tops = ", ".join(f"{short_class_name(c['name'])} (w={c['w']:.1f})" for c in r.datl["top_classes"][:k])
        out.append(f"{r.label}: your images look like: {tops}")
    return out
