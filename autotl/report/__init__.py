"""``autotl report RUN_DIR``: one self-contained HTML page about a run.

Sections, each from the artefacts the run folder holds (a one-line note when they are absent):
the best strategy in words (model.json), the data (data.json: classes, counts per split, skipped
files), the source-model ranking with DATL weights (scoring.json, datl/*.npz), the search (the
Optuna study opened read-only from the storage in the card, else study.db; leaderboard.json as a
fallback: trial leaderboard and plots), confusion matrices and per-class metrics on val and test
(result.json), dropped images (dropped.csv), retrieved neighbours (retrieval.csv) and the ONNX
parity check. Everything is inline (CSS, base64 JPEG thumbnails, SVG or plotly figures with
plotly.js once), and a Content-Security-Policy stops the page from loading anything else.

The package stays light at import (no numpy/PIL/optuna) so the CLI can read ``write_report``'s
defaults when it starts. Modules: ``_run`` (reading the folder), ``_doc`` (the page and section
helpers), one module per section (``_strategy``, ``_data``, ``_scoring``, ``_search``,
``_evaluation``, ``_dropout``, ``_retrieval``, ``_onnx``), ``_build`` (header, order, the page),
``_study`` (trials and Optuna plots), ``_html`` / ``_charts`` (markup, SVG).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ._build import PLOT_MODES, REPORT_NAME, build_html, write_report
from ._run import load_run

__all__ = ["write_report", "try_write_report", "load_run", "build_html", "REPORT_NAME", "PLOT_MODES"]


def try_write_report(run_dir) -> Optional[Path]:
    """``write_report`` for the end of ``fit``: a failure is logged, never raised (the model is already saved)."""
    from .. import _console

    try:
        path = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - the report is a convenience; the run's artefacts are what count
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        _console.log(f"[yellow]report skipped[/]: {type(exc).__name__}: {first} (retry with `autotl report {run_dir}`)")
        return None
    _console.log(f"report: {path}")
    return path
