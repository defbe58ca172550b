"""Build ``RUN_DIR/report.html`` from the artefacts a run folder holds.

Each section reads its own artefacts and, when they are absent, becomes a one-line note; nothing
here trains, imports torch, or touches the network. The output is one self-contained file: inline
CSS, images as base64 data URIs, plots as inline SVG or plotly figures with plotly.js inlined once,
and a Content-Security-Policy that forbids the page from loading anything from elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from pathlib import Path
from typing import Callable

from .._io import atomic_write_text
from .._version import __version__
from ..errors import AutotlError
from . import _study
from ._data import data_section
from ._doc import Doc, omitted, summary_cards
from ._dropout import dropout_section
from ._evaluation import evaluation_section
from ._html import CSS, Thumbnails, esc, pct, seconds
from ._onnx import onnx_section
from ._phases import phases_summary
from ._retrieval import retrieval_section
from ._run import RunFolder, load_run
from ._scoring import scoring_section
from ._search import search_section
from ._strategy import strategy_section

REPORT_NAME = "report.html"
PLOT_MODES = ("auto", "plotly", "svg")
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'; "
       "font-src data:; connect-src 'none'; form-action 'none'; base-uri 'none'")


def header(doc: Doc) -> str:
    run = doc.run
    card = run.card or {}
    metrics = run.metrics
    items = []
    est = run.estimate
    if est:  # the one figure to believe leads; each split's figures are in the evaluation section, named
        items.append(("estimate for new images", f'{pct(est["accuracy"])}<div class="sub">95 % interval '
                      f'{pct(est.get("low"))}–{pct(est.get("high"))}; {esc(est.get("kind", ""))}, '
                      f'{esc(est.get("n_images", "?"))} images</div>'))
    else:
        for split in ("val", "test"):
            m = metrics.get(split) or {}
            if run.trained_on(split) or m.get("accuracy") is None:
                continue  # a figure of images the model trained on is no summary of it
            held = " (held out)" if str(run.role(split) or "").startswith("held out") else ""
            items.append((f"{split} accuracy{held}", pct(m["accuracy"])))
            if split == "val" and m.get("macro_f1") is not None:
                items.append((f"val macro-F1{held}", pct(m["macro_f1"])))
    if run.classes:
        items.append(("classes", str(len(run.classes))))
    ds = run.dataset
    if ds.get("n_train") is not None:
        items.append(("train / val / test images", esc(f'{ds.get("n_train", 0)} / {ds.get("n_val", 0)} / {ds.get("n_test", 0)}')))
    search = run.search
    if search:
        items.append(("search trials", esc(search.get("n_trials", len(search.get("leaderboard") or [])))))
    if run.parity:
        ok = run.parity.get("passed")
        items.append(("ONNX parity", '<span class="ok">passed</span>' if ok else '<span class="fail">FAILED</span>'
                      if ok is not None else "-"))
    seconds_taken = (run.result or {}).get("seconds")
    if seconds_taken is not None:
        items.append(("fit time", seconds(seconds_taken)))
    sub = []
    if run.model_name:
        sub.append(f"source model <b>{esc(run.model_name)}</b>" + (f" ({esc(run.weights_origin)})" if run.weights_origin else ""))
    if card.get("created"):
        sub.append(f"created {esc(card['created'])}")
    if card.get("autotl_version"):
        sub.append(f"autotl {esc(card['autotl_version'])}")
    return (f'<header class="top"><h1>autotl report: {esc(run.dir.resolve().name)}</h1>'
            f'<div class="sub mono">{esc(run.dir.resolve())}</div>'
            + (f'<div class="sub">{" · ".join(sub)}</div>' if sub else "")
            + (summary_cards(items) if items else "") + phases_summary(run) + "</header>")


SECTIONS: tuple[Callable[[Doc], str], ...] = (strategy_section, data_section, scoring_section, search_section,
                                              evaluation_section, dropout_section, retrieval_section, onnx_section)


def build_html(run: RunFolder, *, plots: str = "auto") -> tuple[str, Doc]:
    start = time.perf_counter()
    roots = [r for r in (run.data_root, str(run.dir), os.getcwd()) if r]
    doc = Doc(run=run, plots=plots, thumbs=Thumbnails(roots))
    parts = []
    for fn in SECTIONS:
        t0 = time.perf_counter()
        try:
            parts.append(fn(doc))
        except Exception as exc:  # noqa: BLE001 - one odd artefact never costs the whole report
            name = fn.__name__.removesuffix("_section")
            parts.append(omitted(name, name.capitalize(), f"could not be rendered ({esc(type(exc).__name__)}: "
                                  f"{esc(str(exc).splitlines()[0][:160] if str(exc) else '')})"))
        doc.timings[fn.__name__] = time.perf_counter() - t0
    head = header(doc)
    toc = '<nav class="toc">' + "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in doc.toc) + "</nav>"
    problems = "".join(f'<p class="note warn">{esc(p)}</p>' for p in run.problems)
    took = time.perf_counter() - start
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    footer = (f"<footer>Written by <code>autotl report</code> (autotl {esc(__version__)}) on {esc(now)} in {took:.2f} s; "
              f"a single self-contained file: nothing is loaded from the network.</footer>")
    script = tail = ""
    if doc.needs_plotly:
        script = f'<script type="text/javascript">{_study.plotly_js()}</script>'
        # figures are drawn while the page is parsed; fit them to their final cells once it has loaded
        tail = ("<script>window.addEventListener('load',function(){document.querySelectorAll('.js-plotly-plot')"
                ".forEach(function(g){Plotly.Plots.resize(g);});});</script>")
    html_doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>autotl report: {esc(run.dir.resolve().name)}</title><style>{CSS}</style>{script}</head>"
                f"<body><main>{head}{toc}{problems}{''.join(parts)}{footer}</main>{tail}</body></html>\n")
    return html_doc, doc


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, plots: str = "auto") -> Path:
    """Write ``RUN_DIR/report.html`` (or ``out``): one self-contained HTML page about the run.

    ``plots``: ``auto`` (plotly figures with plotly.js inlined once when plotly is installed and
    the study can be opened, else static SVG), ``plotly`` (same, but say so when it falls back) or
    ``svg`` (static SVG only: small and script-free). Raises ``AutotlError`` when ``run_dir`` is
    not a run folder. Returns the path written.
    """
    from .._runfolder import hold_run_folder
    from ..options import check_report_options

    if plots not in PLOT_MODES:
        raise AutotlError(f"--plots {plots!r}: use one of {', '.join(PLOT_MODES)}")
    check_report_options(out=out, run_dir=run_dir if Path(run_dir).is_dir() else None)  # (load_run says what else is wrong)
    path = Path(out) if out is not None else Path(run_dir) / REPORT_NAME
    in_run = Path(run_dir).is_dir() and os.path.realpath(path.parent) == os.path.realpath(run_dir)
    # written into the run folder: that folder is ours meanwhile (not while a fit replaces it)
    with hold_run_folder(run_dir, flag="RUN_DIR", command="report") if in_run else contextlib.nullcontext():
        run = load_run(run_dir)
        check_report_options(out=out, run_dir=run_dir, data_dir=run.data_root)
        html_doc, _ = build_html(run, plots=plots)
        return atomic_write_text(path, html_doc)
