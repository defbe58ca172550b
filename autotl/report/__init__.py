"""``autotl report RUN_DIR``: one self-contained HTML page about a run (issue 7).

Sections, each from the artefacts the run folder holds (a one-line note when they are absent):
the best strategy in words (model.json), the data (data.json: classes, counts per split, skipped
files), the source-model ranking with DATL weights (scoring.json, datl/*.npz), the search (the
Optuna study opened read-only from the storage in the card, else study.db; leaderboard.json as a
fallback: trial leaderboard and plots), confusion matrices and per-class metrics on val and test
(result.json), dropped images (dropped.csv), retrieved neighbours (retrieval.csv) and the ONNX
parity check. Everything is inline (CSS, base64 JPEG thumbnails, SVG or plotly figures with
plotly.js once), and a Content-Security-Policy stops the page from loading anything else.

This module stays light (no numpy/PIL/optuna at import) so the CLI can register the command cheaply.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ._build import PLOT_MODES, REPORT_NAME, build_html, load_run, write_report

__all__ = ["write_report", "try_write_report", "report_command", "load_run", "build_html", "REPORT_NAME", "PLOT_MODES"]


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


def report_command(
    run_dir: Path = typer.Argument(..., help="Run folder written by `autotl fit` (its --out)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default RUN_DIR/report.html)."),
    plots: str = typer.Option("auto", "--plots", help="auto (plotly when installed, else SVG), plotly or svg (small, no script)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with the data, source-model ranking, search,
    evaluation, dropped images, retrieved neighbours and ONNX parity of a run."""
    from .. import _console

    _console.set_quiet(as_json)
    path = write_report(run_dir, out, plots=plots)
    if as_json:
        sys.stdout.write(json.dumps({"report": str(path)}, indent=2) + "\n")
        sys.stdout.flush()
    else:
        _console.log(f"wrote {path}")
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
