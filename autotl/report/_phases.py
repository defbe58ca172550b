"""Where the fit's time went: its phases (scan, scoring, caches, search, refit, export, ...) as one
stacked bar and a small table in the report's summary."""

from __future__ import annotations

from ._html import esc, num, seconds, table
from ._run import RunFolder

# one colour per position (phases keep the order they ran in); the time no phase measured is grey
_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
            "#86bcb6", "#d37295", "#a0cbe8")
_OTHER = "#bab0ac"


def phases_summary(run: RunFolder) -> str:
    """The phases with their seconds and share of the wall time ('' for a run that recorded none)."""
    phases = run.phases
    if not phases:
        return ""
    total = sum(phases.values())
    wall = run.wall_seconds
    wall = wall if wall is not None and wall >= total else total
    rows = [(name, s, _COLOURS[i % len(_COLOURS)]) for i, (name, s) in enumerate(phases.items())]
    if wall - total > 0.005 * wall:
        rows.append(("other (between phases)", wall - total, _OTHER))
    share = (lambda s: s / wall) if wall > 0 else (lambda s: 0.0)
    bar = '<div class="phasebar">' + "".join(
        f'<span style="width:{100 * share(s):.2f}%;background:{c}" title="{esc(name)}: {esc(seconds(s))}"></span>'
        for name, s, c in rows) + "</div>"
    body = table(["phase", "seconds", "share"],
                 [[f'<span class="swatch" style="background:{c}"></span>{esc(name)}', num(round(s, 2)), f"{100 * share(s):.0f}%"]
                  for name, s, c in rows], numeric=(1, 2), cls="phases")
    return (f'<div class="phases"><h3>Where the time went ({esc(seconds(wall))} in all)</h3>{bar}{body}</div>')
