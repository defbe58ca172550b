"""HTML building blocks for the run report: escaping, number formats, tables, thumbnails, CSS.

Every string that can come from the user (file and class names, paths, model names, parameter
values) goes through :func:`esc`; everything else here is markup we write ourselves.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence


def esc(value: Any) -> str:
    """``html.escape`` of ``str(value)`` (quotes too: safe inside attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def num(x: Any, digits: int = 4) -> str:
    """A number for a table cell: ``-`` for None/NaN, ints as ints, tiny/huge floats in e-notation."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return esc(x)
    if not math.isfinite(f):
        return "-"
    if f == 0:
        return "0"
    if abs(f) < 1e-3 or abs(f) >= 1e6:
        return f"{f:.2e}"
    return f"{f:.{digits}g}"


def pct(x: Any, digits: int = 1) -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "-"
    return f"{100 * f:.{digits}f}%" if math.isfinite(f) else "-"


def seconds(s: Any) -> str:
    try:
        s = float(s)
    except (TypeError, ValueError):
        return "-"
    if not math.isfinite(s):
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def value_text(v: Any) -> str:
    """A parameter value in words (floats short), unescaped."""
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_text(x) for x in v) + "]"
    return str(v)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "", row_classes: Sequence[str] | None = None,
          numeric: Sequence[int] = ()) -> str:
    """A ``<table>``: ``header`` cells are escaped, row cells are already HTML."""
    numeric = set(numeric)
    out = [f'<table class="{cls}">' if cls else "<table>", "<thead><tr>"]
    out += [f'<th{" class=num" if i in numeric else ""}>{esc(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for k, row in enumerate(rows):
        rc = row_classes[k] if row_classes is not None and k < len(row_classes) else ""
        out.append(f'<tr class="{rc}">' if rc else "<tr>")
        out += [f'<td{" class=num" if i in numeric else ""}>{cell}</td>' for i, cell in enumerate(row)]
        out.append("</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def kv_list(items: Iterable[tuple[str, str]]) -> str:
    """A definition list: keys escaped, values already HTML."""
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def bar(fraction: float, text: str = "", *, cls: str = "") -> str:
    """A small horizontal bar (CSS only) with ``text`` (HTML) beside it."""
    f = 0.0 if not math.isfinite(fraction) else min(1.0, max(0.0, fraction))
    return (f'<span class="bar {cls}"><span style="width:{100 * f:.1f}%"></span></span>'
            + (f' <span class="bartext">{text}</span>' if text else ""))


def short_path(path: str, root: str | None) -> str:
    """``path`` relative to ``root`` when inside it (shorter captions), else as given."""
    if root:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


# --------------------------------------------------------------------------------- thumbnails
class Thumbnails:
    """Small JPEG data URIs of image files (PIL only; cached by path; a missing file gives None)."""

    def __init__(self, roots: Sequence[str | os.PathLike], size: int = 112, quality: int = 72):
        self.roots = [Path(r) for r in roots if r]
        self.size = size
        self.quality = quality
        self._cache: dict[str, str | None] = {}
        self.made = 0

    def resolve(self, path: str) -> Path | None:
        p = Path(path)
        if p.is_absolute():
            return p if p.is_file() else None
        for root in self.roots:
            if (root / p).is_file():
                return root / p
        return p if p.is_file() else None

    def uri(self, path: str) -> str | None:
        if path in self._cache:
            return self._cache[path]
        uri = None
        found = self.resolve(path)
        if found is not None:
            try:
                uri = self._encode(found)
            except Exception:  # noqa: BLE001 - unreadable image: the caption says so
                uri = None
        self._cache[path] = uri
        return uri

    def _encode(self, path: Path) -> str:
        from .._images import load_rgb

        img = load_rgb(path, draft_size=(2 * self.size, 2 * self.size))
        img.thumbnail((self.size, self.size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=self.quality, optimize=True)
        self.made += 1
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def figure(self, path: str, caption: str, *, title: str | None = None, cls: str = "") -> str:
        """``<figure>`` with the thumbnail (or a grey box saying why not) and an HTML caption."""
        uri = self.uri(path)
        tip = esc(title if title is not None else path)
        if uri is None:
            img = f'<div class="noimg" title="{tip}">image not found</div>'
        else:
            img = f'<img src="{uri}" alt="{esc(Path(path).name)}" title="{tip}" loading="lazy">'
        return f'<figure class="thumb {cls}">{img}<figcaption>{caption}</figcaption></figure>'


def png_data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


CSS = """
:root{--fg:#1d232b;--muted:#5f6b7a;--line:#dde2e8;--bg:#fff;--soft:#f5f7fa;--accent:#2b6cb0;--good:#2f855a;--bad:#c53030;--warn:#b7791f}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
header.top{border-bottom:2px solid var(--line);margin-bottom:10px;padding-bottom:10px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:1px solid var(--line)}
h3{font-size:15px;margin:20px 0 8px}
.sub{color:var(--muted)}
nav.toc{display:flex;flex-wrap:wrap;gap:6px 14px;margin:10px 0 4px;font-size:13px}
nav.toc a{color:var(--accent);text-decoration:none}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:var(--soft);border:1px solid var(--line);border-radius:8px;padding:8px 12px;min-width:104px}
.card .v{font-size:20px;font-weight:600}
.card .k{font-size:12px;color:var(--muted)}
.card .v .sub{font-size:11px;font-weight:400}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
th,td{border-bottom:1px solid var(--line);padding:4px 9px;text-align:left;vertical-align:top}
th{background:var(--soft);font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.best td{background:#e6f4ea;font-weight:600}
tr.dim td{color:var(--muted)}
tr.total td{font-weight:600;border-top:2px solid var(--line)}
.wrap{overflow-x:auto;max-width:100%}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.params{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px;color:#333;max-width:520px}
p.note,p.omitted{color:var(--muted);margin:6px 0}
p.omitted{margin:14px 0;padding:6px 10px;background:var(--soft);border-left:3px solid var(--line)}
p.omitted b{color:var(--fg)}
.words{font-size:15px;background:#eef5fc;border-left:4px solid var(--accent);padding:10px 14px;margin:8px 0 12px}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:3px 16px;margin:8px 0}
dl.kv dt{color:var(--muted)}
dl.kv dd{margin:0}
.bar{display:inline-block;width:120px;height:10px;background:var(--soft);border:1px solid var(--line);vertical-align:middle;border-radius:2px}
.bar>span{display:block;height:100%;background:var(--accent);border-radius:2px}
.bartext{font-variant-numeric:tabular-nums}
.phasebar{display:flex;height:14px;max-width:720px;border:1px solid var(--line);border-radius:3px;overflow:hidden;margin:4px 0}
.phasebar>span{display:block;height:100%;border-right:1px solid #fff}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:middle}
.ok{color:var(--good);font-weight:600}.fail{color:var(--bad);font-weight:600}.warn{color:var(--warn)}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.thumb{margin:0;width:124px;font-size:11px;line-height:1.3}
figure.thumb img,figure.thumb .noimg{width:112px;height:112px;object-fit:contain;background:var(--soft);border:1px solid var(--line);border-radius:4px;display:block}
figure.thumb .noimg{display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:11px}
figure.thumb figcaption{margin-top:3px;word-break:break-word}
figure.thumb.target img{border:2px solid var(--accent)}
.mismatch{color:var(--bad);font-weight:600}
.nbrow{display:flex;gap:10px;align-items:flex-start;padding:8px 0;border-bottom:1px solid var(--line)}
.nbrow .arrow{align-self:center;color:var(--muted);font-size:20px}
table.confusion td,table.confusion th{text-align:center;min-width:34px;padding:3px 6px}
table.confusion th.rowh{text-align:right;max-width:180px;overflow:hidden;text-overflow:ellipsis}
table.confusion th.colh{max-width:90px;overflow:hidden;text-overflow:ellipsis}
.cm-axis{font-size:12px;color:var(--muted)}
.plots{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:16px}
.plot.wide{grid-column:1/-1}
@media (max-width:900px){.plots,.twocol{grid-template-columns:minmax(0,1fr)}}
.plot{border:1px solid var(--line);border-radius:6px;padding:6px;background:#fff;min-width:0}
.plot h3{margin:2px 4px 6px;font-size:13px}
svg text{font-family:inherit}
.twocol{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:8px 26px}
footer{margin-top:40px;color:var(--muted);font-size:12px;border-top:1px solid var(--line);padding-top:8px}
"""
