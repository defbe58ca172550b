"""Explaining a data dropout: ``dropped.csv``, ``influence.csv``, a thumbnail sheet, a rich table."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .._csv import safe_row
from .._io import atomic_path, atomic_write_text
from ..data import Sample
from .influence import InfluenceResult

__all__ = ["DROPPED_COLUMNS", "dropout_rows", "write_dropout_files", "write_contact_sheet", "harmful_table"]

DROPPED_COLUMNS = ("rank", "path", "given_label", "predicted_label", "influence", "influence_spreads", "prob_given")
INFLUENCE_COLUMNS = (*DROPPED_COLUMNS, "dropped")


def dropout_rows(samples: Sequence[Sample], classes: Sequence[str], result: InfluenceResult, keep: np.ndarray,
                 spread: float | None = None) -> list[dict]:
    """One dict per training image, most harmful (highest score) first.

    ``influence``: predicted reduction of the total reference (validation) loss if the image is
    removed (positive = harmful); ``influence_spreads``: the same in robust-spread units (what
    ``tau`` is compared with in mode ``"spread"``).
    """
    from .selection import robust_spread

    scores = np.asarray(result.scores, dtype=np.float64)
    spread = robust_spread(scores) if spread is None else spread
    order = np.argsort(-scores, kind="stable")
    in_spreads = scores / spread if spread > 0 else np.zeros_like(scores)
    names = np.asarray(classes, dtype=object)
    given = names[np.fromiter((s.label for s in samples), dtype=np.int64, count=len(samples))]
    predicted = names[np.asarray(result.predicted, dtype=np.int64)]
    return [
        {
            "rank": rank + 1,
            "path": os.fspath(samples[i].path),
            "given_label": given[i],
            "predicted_label": predicted[i],
            "influence": float(scores[i]),
            "influence_spreads": float(in_spreads[i]),
            "prob_given": float(result.prob_given[i]),
            "dropped": int(not keep[i]),
        }
        for rank, i in enumerate(order.tolist())
    ]


def _csv_text(rows: list[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(safe_row({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}))
    return buf.getvalue()


def write_dropout_files(run_dir: str | os.PathLike, samples: Sequence[Sample], classes: Sequence[str],
                        result: InfluenceResult, keep: np.ndarray, *, thumbnails: int = 24) -> dict[str, Path]:
    """Write ``dropped.csv`` (dropped images, most harmful first), ``influence.csv`` (every training
    image, same order) and ``dropped.jpg`` (thumbnails of the most harmful dropped images), atomically."""
    run_dir = Path(run_dir)
    rows = dropout_rows(samples, classes, result, keep)
    dropped = [r for r in rows if r["dropped"]]
    paths = {
        "dropped_csv": atomic_write_text(run_dir / "dropped.csv", _csv_text(dropped, DROPPED_COLUMNS)),
        "influence_csv": atomic_write_text(run_dir / "influence.csv", _csv_text(rows, INFLUENCE_COLUMNS)),
    }
    if thumbnails and dropped:
        sheet = write_contact_sheet(dropped[:thumbnails], run_dir / "dropped.jpg")
        if sheet is not None:
            paths["dropped_thumbnails"] = sheet
    return paths


def write_contact_sheet(rows: list[dict], path: str | os.PathLike, *, thumb: int = 128, columns: int = 6) -> Path | None:
    """A JPEG grid of the images in ``rows`` captioned ``given -> predicted`` (None if nothing loads)."""
    from PIL import Image, ImageDraw

    from .._images import load_rgb

    tiles = []
    for r in rows:
        try:
            img = load_rgb(r["path"])
        except Exception:  # an unreadable file is listed in the csv; skip its thumbnail
            continue
        img.thumbnail((thumb, thumb))
        tiles.append((img, f"#{r['rank']} {r['given_label']}->{r['predicted_label']}"[:24]))
    if not tiles:
        return None
    cols = min(columns, len(tiles))
    rows_n = math.ceil(len(tiles) / cols)
    cap = 14
    sheet = Image.new("RGB", (cols * (thumb + 4), rows_n * (thumb + cap + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, text) in enumerate(tiles):
        x0 = (k % cols) * (thumb + 4) + 2
        y0 = (k // cols) * (thumb + cap + 4) + 2
        sheet.paste(img, (x0 + (thumb - img.width) // 2, y0 + (thumb - img.height) // 2))
        draw.text((x0, y0 + thumb + 1), text, fill="black")
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="JPEG", quality=85)
    return path


def _short(path: str, root) -> str:
    if root is not None:
        try:
            return Path(path).relative_to(root).as_posix()
        except ValueError:
            pass
    return str(path)


def harmful_table(rows: list[dict], *, top: int = 20, title: str | None = None, root: str | os.PathLike | None = None):
    """A rich table of the ``top`` most harmful images (rows as from ``dropout_rows``); paths are
    shown relative to ``root`` when given."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col, justify in (("#", "right"), ("influence", "right"), ("spreads", "right"), ("given", "left"),
                         ("predicted", "left"), ("p(given)", "right"), ("dropped", "center"), ("path", "left")):
        table.add_column(col, justify=justify, overflow="fold" if col == "path" else "ellipsis")
    for r in rows[:top]:
        mismatch = r["given_label"] != r["predicted_label"]
        table.add_row(
            str(r["rank"]), f"{r['influence']:.3g}", f"{r['influence_spreads']:.1f}", escape(str(r["given_label"])),
            f"[yellow]{escape(str(r['predicted_label']))}[/]" if mismatch else escape(str(r["predicted_label"])),
            f"{r['prob_given']:.2f}", "yes" if r["dropped"] else "", escape(_short(r["path"], root)),
        )
    return table
