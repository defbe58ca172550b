"""The page being built (``Doc``) and the pieces every section uses: a titled section, the one-line
note for an absent one, summary cards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ._html import Thumbnails, esc
from ._run import RunFolder


@dataclass
class Doc:
    run: RunFolder
    plots: str
    thumbs: Thumbnails
    needs_plotly: bool = False
    toc: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def section(doc: Doc, anchor: str, title: str, body: str) -> str:
    doc.toc.append((anchor, title))
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def omitted(anchor: str, title: str, why: str) -> str:
    """The one line that stands for a section this run has no artefacts for (``why`` is HTML)."""
    return f'<p class="omitted" id="{anchor}"><b>{esc(title)}</b> — {why}</p>'


def summary_cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
                                           for k, v in items) + "</div>"


def finite_float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
