"""Static inline SVG charts (no JavaScript, no plotly): line/scatter charts and parallel coordinates.

Used for the training history always, and for the search plots when plotly is not installed (or
``plots="svg"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ._html import esc

PALETTE = ("#2b6cb0", "#dd6b20", "#2f855a", "#c53030", "#6b46c1", "#319795", "#b7791f", "#718096")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step and len(ticks) < 50:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.0e}"
    return f"{v:.4g}"


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = ""
    mode: str = "line"  # line | markers | both | step
    dashed: bool = False
    right_axis: bool = False
    marker_colors: Sequence[str] = field(default_factory=list)
    tips: Sequence[str] = field(default_factory=list)


def line_chart(series: Sequence[Series], *, title: str = "", x_label: str = "", y_label: str = "", y2_label: str = "",
               width: int = 540, height: int = 250, integer_x: bool = True) -> str:
    """An SVG chart of ``series`` (left axis, optional right axis); None values are gaps."""
    left = [s for s in series if not s.right_axis]
    right = [s for s in series if s.right_axis]
    legend_y = 30 if title else 12  # legend row above the plot area
    ml, mr, mt, mb = 52, (52 if right else 16), legend_y + 12, 40
    pw, ph = width - ml - mr, height - mt - mb
    xs_all = [float(x) for s in series for x in s.xs]
    if not xs_all:
        return ""
    x0, x1 = min(xs_all), max(xs_all)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def yrange(group):
        ys = [float(y) for s in group for y in s.ys if y is not None and math.isfinite(float(y))]
        if not ys:
            return 0.0, 1.0
        lo, hi = min(ys), max(ys)
        pad = (hi - lo) * 0.08 or (abs(hi) * 0.05 or 0.5)
        return lo - pad, hi + pad

    ly0, ly1 = yrange(left)
    ry0, ry1 = yrange(right)

    def sx(x):
        return ml + (float(x) - x0) / (x1 - x0) * pw

    def sy(y, r=False):
        a, b = (ry0, ry1) if r else (ly0, ly1)
        return mt + ph - (float(y) - a) / (b - a) * ph

    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="{esc(title)}" style="max-width:100%;height:auto">']
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#dde2e8"/>')
    if title:
        out.append(f'<text x="{ml}" y="16" font-size="13" font-weight="600" fill="#1d232b">{esc(title)}</text>')
    xt = nice_ticks(x0, x1, 6)
    if integer_x:
        xt = sorted({int(round(t)) for t in xt if abs(t - round(t)) < 1e-9}) or xt
    for t in xt:
        if x0 - 1e-9 <= t <= x1 + 1e-9:
            X = sx(t)
            out.append(f'<line x1="{X:.1f}" y1="{mt + ph}" x2="{X:.1f}" y2="{mt + ph + 4}" stroke="#5f6b7a"/>'
                       f'<text x="{X:.1f}" y="{mt + ph + 16}" font-size="11" text-anchor="middle" fill="#5f6b7a">{_tick_label(t)}</text>')
    for t in nice_ticks(ly0, ly1, 5):
        if ly0 <= t <= ly1:
            Y = sy(t)
            out.append(f'<line x1="{ml}" y1="{Y:.1f}" x2="{ml + pw}" y2="{Y:.1f}" stroke="#eef1f4"/>'
                       f'<text x="{ml - 5}" y="{Y + 4:.1f}" font-size="11" text-anchor="end" fill="#5f6b7a">{_tick_label(t)}</text>')
    if right:
        for t in nice_ticks(ry0, ry1, 5):
            if ry0 <= t <= ry1:
                Y = sy(t, True)
                out.append(f'<text x="{ml + pw + 5}" y="{Y + 4:.1f}" font-size="11" fill="#5f6b7a">{_tick_label(t)}</text>')
    if x_label:
        out.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#5f6b7a">{esc(x_label)}</text>')
    if y_label:
        out.append(f'<text transform="translate(13,{mt + ph / 2:.1f}) rotate(-90)" font-size="11" text-anchor="middle" fill="#5f6b7a">{esc(y_label)}</text>')
    if y2_label and right:
        out.append(f'<text transform="translate({width - 8},{mt + ph / 2:.1f}) rotate(90)" font-size="11" text-anchor="middle" fill="#5f6b7a">{esc(y2_label)}</text>')
    for k, s in enumerate(series):
        color = s.color or PALETTE[k % len(PALETTE)]
        pts = [(sx(x), sy(y, s.right_axis)) if y is not None and math.isfinite(float(y)) else None for x, y in zip(s.xs, s.ys)]
        if s.mode in ("line", "both", "step"):
            segs, cur = [], []
            for p in pts:
                if p is None:
                    if cur:
                        segs.append(cur)
                    cur = []
                else:
                    if s.mode == "step" and cur:
                        cur.append((p[0], cur[-1][1]))
                    cur.append(p)
            if cur:
                segs.append(cur)
            dash = ' stroke-dasharray="5 3"' if s.dashed else ""
            for seg in segs:
                d = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
                out.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        if s.mode in ("markers", "both") or (s.mode == "line" and len([p for p in pts if p]) == 1):
            for i, p in enumerate(pts):
                if p is None:
                    continue
                c = s.marker_colors[i] if i < len(s.marker_colors) and s.marker_colors[i] else color
                tip = f"<title>{esc(s.tips[i])}</title>" if i < len(s.tips) and s.tips[i] else ""
                out.append(f'<circle cx="{p[0]:.1f}" cy="{p[1]:.1f}" r="4" fill="{c}" stroke="#fff" stroke-width="1">{tip}</circle>')
    # legend
    lx = ml
    for k, s in enumerate(series):
        color = s.color or PALETTE[k % len(PALETTE)]
        label = s.name + (" (right axis)" if s.right_axis else "")
        swatch = (f'<line x1="{lx}" y1="{legend_y - 4}" x2="{lx + 14}" y2="{legend_y - 4}" stroke="{color}" stroke-width="2"'
                  + (' stroke-dasharray="4 2"' if s.dashed else "") + "/>") if s.mode in ("line", "step", "both") else \
            f'<circle cx="{lx + 7}" cy="{legend_y - 4}" r="4" fill="{color}"/>'
        out.append(swatch + f'<text x="{lx + 18}" y="{legend_y}" font-size="11" fill="#1d232b">{esc(label)}</text>')
        lx += 30 + 6.0 * len(label)
    out.append("</svg>")
    return "".join(out)


def _lerp_color(a: str, b: str, t: float) -> str:
    ca = [int(a[i:i + 2], 16) for i in (1, 3, 5)]
    cb = [int(b[i:i + 2], 16) for i in (1, 3, 5)]
    t = min(1.0, max(0.0, t))
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))


def value_color(v: float, lo: float, hi: float) -> str:
    """Low values light blue-grey, high values deep blue."""
    return _lerp_color("#c3d3e6", "#1a4f8a", 0.5 if hi <= lo else (v - lo) / (hi - lo))


def parallel_coordinates(rows: Sequence[dict[str, Any]], params: Sequence[str], *, objective: str = "value",
                         width: int = 1080, height: int = 300) -> str:
    """SVG parallel coordinates: one axis per parameter + the objective, one line per trial
    (``rows``: {"params": {...}, "value": float, "number": int}); darker = better."""
    rows = [r for r in rows if r.get("value") is not None and math.isfinite(float(r["value"]))]
    if not rows or not params:
        return ""
    axes = list(params) + [objective]
    ml, mr, mt, mb = 40, 70, 34, 18
    pw, ph = width - ml - mr, height - mt - mb - 22
    na_y = mt + ph + 16  # trials without a parameter (conditional spaces) meet in an "n/a" slot below its axis
    step = pw / max(1, len(axes) - 1)

    def get(r, k):
        a = axes[k]
        return r["value"] if k == len(axes) - 1 else r["params"].get(a)

    scales = []
    for k, a in enumerate(axes):
        vals = [get(r, k) for r in rows]
        present = [v for v in vals if v is not None]
        numeric = present and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in present)
        if numeric:
            lo, hi = float(min(present)), float(max(present))
            log = lo > 0 and hi / lo > 20
            if log:
                lo, hi = math.log10(lo), math.log10(hi)
            scales.append(("num", lo, hi, log, None))
        else:
            cats = sorted({str(v) for v in present}, key=lambda c: (len(c), c))
            scales.append(("cat", 0, max(1, len(cats) - 1), False, cats))

    def pos(k, v):
        kind, lo, hi, log, cats = scales[k]
        if v is None:
            return na_y
        if kind == "cat":
            f = cats.index(str(v)) / (len(cats) - 1) if len(cats) > 1 else 0.5
        else:
            x = math.log10(float(v)) if log else float(v)
            f = 0.5 if hi <= lo else (x - lo) / (hi - lo)
        return mt + ph - f * ph

    out = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'role="img" aria-label="parallel coordinates" style="max-width:100%;height:auto">']
    values = [float(r["value"]) for r in rows]
    vlo, vhi = min(values), max(values)
    for r in sorted(rows, key=lambda r: float(r["value"])):  # best drawn last (on top)
        pts = []
        for k in range(len(axes)):
            v = get(r, k)
            pts.append(f"{ml + k * step:.1f},{pos(k, v):.1f}")
        c = value_color(float(r["value"]), vlo, vhi)
        out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{c}" stroke-width="2" opacity="0.85">'
                   f'<title>trial {esc(r.get("number"))}: {esc(objective)} {float(r["value"]):.4g}</title></polyline>')
    for k, a in enumerate(axes):
        X = ml + k * step
        kind, lo, hi, log, cats = scales[k]
        out.append(f'<line x1="{X:.1f}" y1="{mt}" x2="{X:.1f}" y2="{mt + ph}" stroke="#5f6b7a"/>')
        anchor = "start" if k == 0 else ("end" if k == len(axes) - 1 else "middle")
        out.append(f'<text x="{X:.1f}" y="{mt - 14}" font-size="12" font-weight="600" text-anchor="{anchor}" fill="#1d232b">{esc(a)}</text>')
        if kind == "cat":
            labels = [(c, pos(k, c)) for c in cats]
        else:
            labels = [(lo, mt + ph), (hi, mt)] if hi > lo else [(lo, mt + ph / 2)]
            labels = [(_tick_label(10 ** v if log else v), y) for v, y in labels]
        if any(get(r, k) is None for r in rows):
            labels.append(("n/a", na_y))
        for text, y in labels:
            out.append(f'<text x="{X + 4:.1f}" y="{y + 4:.1f}" font-size="10" fill="#5f6b7a" '
                       f'paint-order="stroke" stroke="#fff" stroke-width="3">{esc(str(text)[:18])}</text>')
    out.append("</svg>")
    return "".join(out)


def heatmap_png(matrix: Sequence[Sequence[float]], cell: int = 4) -> Any:
    """A PIL image of a row-normalised matrix (white → blue), ``cell`` pixels per entry."""
    import numpy as np
    from PIL import Image

    m = np.asarray(matrix, dtype=np.float64)
    rows = m.sum(1, keepdims=True)
    f = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    lo = np.array([255, 255, 255], dtype=np.float64)
    hi = np.array([26, 79, 138], dtype=np.float64)
    rgb = (lo + (hi - lo) * f[..., None]).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img.resize((m.shape[1] * cell, m.shape[0] * cell), Image.NEAREST)
