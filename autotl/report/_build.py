"""Build ``RUN_DIR/report.html`` from the artefacts a run folder holds.

Each section reads its own artefacts and, when they are absent, becomes a one-line note; nothing
here trains, imports torch, or touches the network. The output is one self-contained file: inline
CSS, images as base64 data URIs, plots as inline SVG or plotly figures with plotly.js inlined once,
and a Content-Security-Policy that forbids the page from loading anything from elsewhere.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .._io import atomic_write_text
from .._version import __version__
from ..errors import AutotlError
from . import _charts, _study
from ._html import CSS, Thumbnails, bar, esc, kv_list, num, pct, png_data_uri, seconds, short_path, table, value_text

REPORT_NAME = "report.html"
PLOT_MODES = ("auto", "plotly", "svg")
MAX_DROPPED = 24  # thumbnails of the most harmful dropped images
MAX_TARGETS = 6  # target images shown with their retrieved neighbours
MAX_NEIGHBOURS = 6  # neighbours per target
MAX_TRIAL_ROWS = 60
MAX_SKIPPED_ROWS = 100
MAX_CONFUSION_TABLE = 25  # classes; above this the confusion matrix is a heat-map image
DATL_TOP = 8
#: Files whose presence makes a folder a run folder the report can describe.
ARTEFACTS = ("model.json", "result.json", "data.json", "scoring.json", "leaderboard.json", "study.db", "dropped.csv",
             "retrieval.csv", "history.json")
CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline' 'unsafe-eval'; "
       "font-src data:; connect-src 'none'; form-action 'none'; base-uri 'none'")


# ------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything read from a run folder (each item None when absent or unreadable)."""

    dir: Path
    card: dict | None = None
    result: dict | None = None
    data: dict | None = None
    history: list | None = None
    scoring: dict | None = None
    leaderboard: list | None = None
    problems: list[str] = field(default_factory=list)  # "file: why it could not be read"

    def _pick(self, key: str) -> Any:
        for doc in (self.card, self.result):
            if isinstance(doc, dict) and doc.get(key):
                return doc[key]
        return None

    @property
    def strategy(self) -> dict:
        return self._pick("strategy") or {}

    @property
    def metrics(self) -> dict:
        res = (self.result or {}).get("metrics")  # result.json keeps the confusion matrices
        return res if isinstance(res, dict) and res else ((self.card or {}).get("metrics") or {})

    @property
    def parity(self) -> dict:
        return self._pick("parity") or {}

    @property
    def search(self) -> dict | None:
        extra = (self.card or {}).get("extra") or {}
        return extra.get("search") or (self.result or {}).get("search") or None

    @property
    def dataset(self) -> dict:
        if isinstance(self.data, dict):
            return self.data
        return (self.result or {}).get("data") or (self.card or {}).get("data") or {}

    @property
    def classes(self) -> list[str]:
        for doc in (self.card, self.result, self.dataset):
            if isinstance(doc, dict) and doc.get("classes"):
                return [str(c) for c in doc["classes"]]
        return [str(c) for c in ((self.scoring or {}).get("data") or {}).get("classes") or []]

    @property
    def model_name(self) -> str | None:
        sm = (self.card or {}).get("source_model") or {}
        return sm.get("name") or (self.result or {}).get("source_model")

    @property
    def weights_origin(self) -> str | None:
        sm = (self.card or {}).get("source_model") or {}
        return sm.get("weights_origin") or (self.result or {}).get("weights_origin")

    @property
    def data_root(self) -> str | None:
        root = self.dataset.get("root")
        return str(root) if root else None


def _read_json(run: Run, name: str, kind: type) -> Any:
    path = run.dir / name
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        run.problems.append(f"{name}: cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if not isinstance(doc, kind):
        run.problems.append(f"{name}: expected a JSON {kind.__name__}, found {type(doc).__name__}")
        return None
    return doc


def _read_csv(run: Run, name: str) -> list[dict[str, str]] | None:
    path = run.dir / name
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        run.problems.append(f"{name}: cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
        return None


def load_run(run_dir: str | os.PathLike) -> Run:
    """Read a run folder; raises ``AutotlError`` when it is not one."""
    path = Path(run_dir).expanduser()
    fix = "give the folder written by `autotl fit` (its --out), e.g. `autotl report runs/mydata-20250101-120000`"
    if not path.exists():
        raise AutotlError(f"{path}: no such run folder; {fix}")
    if not path.is_dir():
        raise AutotlError(f"{path}: is a file, not a run folder; {fix}")
    run = Run(path)
    run.card = _read_json(run, "model.json", dict)
    run.result = _read_json(run, "result.json", dict)
    run.data = _read_json(run, "data.json", dict)
    run.history = _read_json(run, "history.json", list)
    run.scoring = _read_json(run, "scoring.json", dict)
    run.leaderboard = _read_json(run, "leaderboard.json", list)
    present = [a for a in ARTEFACTS if (path / a).is_file()] + (["datl/"] if any(path.glob("datl/*.npz")) else [])
    if not present:
        raise AutotlError(f"{path}: not an autotl run folder (none of model.json, result.json, scoring.json, study.db, "
                          f"dropped.csv, retrieval.csv in it); {fix}")
    usable = any(x is not None for x in (run.card, run.result, run.data, run.history, run.scoring, run.leaderboard)) or \
        any(a in present for a in ("study.db", "dropped.csv", "retrieval.csv", "datl/"))
    if not usable:
        raise AutotlError(f"{path / run.problems[0]}; re-run `autotl fit` into this folder to rewrite it" if run.problems
                          else f"{path}: nothing readable in this run folder; {fix}")
    return run


# ------------------------------------------------------------------------------ the document
@dataclass
class Doc:
    run: Run
    plots: str
    thumbs: Thumbnails
    needs_plotly: bool = False
    toc: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _section(doc: Doc, anchor: str, title: str, body: str) -> str:
    doc.toc.append((anchor, title))
    return f'<section id="{anchor}"><h2>{esc(title)}</h2>{body}</section>'


def _omitted(anchor: str, title: str, why: str) -> str:
    """The one line that stands for a section this run has no artefacts for (``why`` is HTML)."""
    return f'<p class="omitted" id="{anchor}"><b>{esc(title)}</b> — {why}</p>'


def _cards(items: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{esc(k)}</div></div>'
                                           for k, v in items) + "</div>"


def _float(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------- header
def header(doc: Doc) -> str:
    run = doc.run
    card = run.card or {}
    metrics = run.metrics
    items = []
    val = metrics.get("val") or {}
    test = metrics.get("test") or {}
    if val.get("accuracy") is not None:
        items.append(("val accuracy", pct(val["accuracy"])))
    if val.get("macro_f1") is not None:
        items.append(("val macro-F1", pct(val["macro_f1"])))
    if test.get("accuracy") is not None:
        items.append(("test accuracy", pct(test["accuracy"])))
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
            + (_cards(items) if items else "") + "</header>")


# -------------------------------------------------------------------------------- strategy
def strategy_words(strategy: dict, model: str | None) -> str:
    """The trained strategy in one sentence (plain text): the search's own description when there
    is one, else built from the card's strategy (the same wording as the search's)."""
    if strategy.get("description"):
        return str(strategy["description"])
    model = model or "the source model"
    frozen, n = strategy.get("frozen_stages"), strategy.get("num_stages")
    names = strategy.get("stage_names") or []
    if isinstance(frozen, int) and isinstance(n, int) and frozen >= n:
        what = f"linear probe on frozen {model} features"
    elif isinstance(frozen, int) and isinstance(n, int):
        tail = f" ({', '.join(map(str, names[frozen:]))})" if len(names) == n else ""
        what = f"fine-tune the last {n - frozen} of {n} stages of {model}{tail} + a new head, first {frozen} frozen"
    else:
        what = f"{model}, frozen_stages={frozen}"
    parts = [what]
    if strategy.get("lr") is not None:
        parts.append(f"lr {value_text(strategy['lr'])}")
    if strategy.get("epochs") is not None:
        parts.append(f"{strategy['epochs']} epochs max")
    reg = strategy.get("regularizer") or "none"
    if reg != "none":
        name = {"l2sp": "L2-SP", "kd": "feature-map KD"}.get(reg, reg)
        lam = value_text(strategy.get("reg_lambda"))
        text = f"{name} (α={lam}, β={value_text(strategy.get('reg_beta'))})" if reg == "l2sp" else f"{name} (λ={lam})"
        if strategy.get("reg_decay") not in (None, 1.0):
            text += f", decayed ×{value_text(strategy['reg_decay'])}/epoch"
        if strategy.get("dtnh"):
            text += ", with DTNH"
        parts.append(text)
    parts += _strategy_notes(strategy)
    return "; ".join(parts)


def _strategy_notes(strategy: dict) -> list[str]:
    notes = strategy.get("strategies") or {}
    out = []
    d = notes.get("dropout") if isinstance(notes, dict) else None
    if isinstance(d, dict) and d.get("n_total"):
        out.append(f"data dropout: {d.get('n_dropped', 0)} of {d['n_total']} training images dropped"
                   + (f" (tau {value_text(d['tau'])}, mode {d.get('mode')})" if d.get("tau") is not None else ""))
    r = notes.get("retrieval") if isinstance(notes, dict) else None
    if isinstance(r, dict) and r:
        used = r.get("pool_images_used", r.get("initial_pool_images"))
        out.append(f"selective joint fine-tuning with {used if used is not None else '?'} source-pool images"
                   + (f" (K0 {r['k0']}" if r.get("k0") is not None else " (")
                   + (f", {r['bank']} filter bank" if r.get("bank") else "")
                   + (f", {r['rounds_run']} rounds" if r.get("rounds_run") else "") + ")")
    return out


def strategy_section(doc: Doc) -> str:
    run = doc.run
    s = run.strategy
    if not s:
        return _omitted("strategy", "Best strategy", "not in this run: no model.json / result.json")
    body = [f'<div class="words">{esc(strategy_words(s, run.model_name))}</div>']
    search = run.search or {}
    best = search.get("best") or {}
    if best:
        body.append(f'<p class="note">Chosen by the search: trial {esc(best.get("number"))} with validation '
                    f'{esc(search.get("objective", "score"))} {num(best.get("value"))}; refit on '
                    f'{"train + val" if search.get("refit_on_val") else "train"}.</p>')
    frozen, n = s.get("frozen_stages"), s.get("num_stages")
    names = s.get("stage_names") or []
    if isinstance(frozen, int) and isinstance(n, int):
        trained = ", ".join(map(str, names[frozen:])) if len(names) == n and frozen < n else ""
        frozen_text = f"{frozen} of {n}" + (" (linear probe: only the new head is trained)" if frozen >= n
                                            else f"; trained: {esc(trained)} + new head" if trained else "")
    else:
        frozen_text = esc(frozen)
    items = []
    if run.model_name:
        items.append(("source model", f"{esc(run.model_name)}" + (f" <span class=sub>({esc(run.weights_origin)})</span>"
                                                                   if run.weights_origin else "")))
    items.append(("frozen stages", frozen_text))
    for key, label in (("lr", "learning rate (head)"), ("backbone_lr_ratio", "backbone lr ratio"), ("epochs", "epochs (max)"),
                       ("batch_size", "batch size"), ("optimizer", "optimizer"), ("weight_decay", "weight decay"),
                       ("label_smoothing", "label smoothing"), ("objective", "objective"), ("n_train", "training images")):
        if s.get(key) is not None:
            items.append((label, esc(value_text(s[key]))))
    if s.get("best_epoch") is not None:
        ran = len(run.history) if run.history else None
        items.append(("best epoch", f"{int(s['best_epoch']) + 1}" + (f" of {ran} run (early stopping on val)" if ran else "")))
    reg = s.get("regularizer") or "none"
    items.append(("regulariser", "none" if reg == "none" else esc(f"{reg} λ={value_text(s.get('reg_lambda'))}"
                                                                  + (" + DTNH" if s.get("dtnh") else ""))))
    if s.get("cached_prefix") is not None:
        items.append(("frozen prefix cached", "yes" if s["cached_prefix"] else "no"))
    for note in _strategy_notes(s):
        items.append(("strategy", esc(note)))
    decided = ((run.card or {}).get("extra") or {}).get("decided_by") or {}
    left = kv_list(items)
    right = ""
    if decided:
        right = "<h3>Which split decided what</h3>" + kv_list((k.replace("_", " "), esc(v)) for k, v in decided.items())
    body.append(f'<div class="twocol"><div>{left}</div><div>{right}</div></div>')
    chart = history_chart(run.history or [])
    if chart:
        body.append(f"<h3>Training of the final model</h3>{chart}")
    return _section(doc, "strategy", "Best strategy", "".join(body))


def history_chart(history: list) -> str:
    rows = [h for h in history if isinstance(h, dict) and h.get("epoch") is not None]
    if not rows:
        return ""
    xs = [int(h["epoch"]) + 1 for h in rows]
    series = [_charts.Series("train loss", xs, [_float(h.get("train_loss")) for h in rows], mode="both"),
              _charts.Series("val loss", xs, [_float(h.get("val_loss")) for h in rows], mode="both")]
    if any(h.get("accuracy") is not None for h in rows):
        series.append(_charts.Series("val accuracy", xs, [_float(h.get("accuracy")) for h in rows], mode="both",
                                     dashed=True, right_axis=True))
    if any(h.get("macro_f1") is not None for h in rows):
        series.append(_charts.Series("val macro-F1", xs, [_float(h.get("macro_f1")) for h in rows], mode="line",
                                     dashed=True, right_axis=True))
    return _charts.line_chart(series, x_label="epoch", y_label="loss", y2_label="score", width=720, height=260)


# ------------------------------------------------------------------------------------ data
def data_section(doc: Doc) -> str:
    run = doc.run
    ds = run.dataset
    if not ds:
        return _omitted("data", "Data", "not in this run: no data.json / model.json")
    classes = [str(c) for c in ds.get("classes") or run.classes]
    counts = ds.get("counts") or {}
    root = run.data_root
    items = []
    if root:
        items.append(("folder", f'<span class="mono">{esc(root)}</span>'))
    split = ds.get("split")
    if split:
        items.append(("split", esc({"folders": "train/ val/ [test/] folders as given"}.get(split, split))))
    items.append(("classes", str(len(classes))))
    items.append(("images", esc(f'{ds.get("n_train", "?")} train, {ds.get("n_val", "?")} val, {ds.get("n_test", "?")} test')))
    skipped = ds.get("skipped")
    n_skipped = len(skipped) if isinstance(skipped, list) else ds.get("n_skipped")
    if n_skipped is not None:
        items.append(("skipped files", str(n_skipped)))
    if ds.get("fingerprint"):
        items.append(("fingerprint", f'<span class="mono">{esc(str(ds["fingerprint"])[:16])}</span>'))
    body = [kv_list(items)]
    if classes and counts:
        rows, tot = [], [0, 0, 0]
        biggest = max((int((counts.get(c) or {}).get("train", 0)) for c in classes), default=0) or 1
        for c in classes:
            k = counts.get(c) or {}
            tr, va, te = (int(k.get(s, 0) or 0) for s in ("train", "val", "test"))
            tot = [tot[0] + tr, tot[1] + va, tot[2] + te]
            rows.append([esc(c), bar(tr / biggest, str(tr)), str(va), str(te), str(tr + va + te)])
        rows.append(["total", str(tot[0]), str(tot[1]), str(tot[2]), str(sum(tot))])
        body.append('<div class="wrap">' + table(["class", "train", "val", "test", "total"], rows, numeric=(2, 3, 4),
                                                 row_classes=[""] * (len(rows) - 1) + ["total"]) + "</div>")
    if isinstance(skipped, list) and skipped:
        shown = skipped[:MAX_SKIPPED_ROWS]
        rows = [[f'<span class="mono">{esc(short_path(str(s.get("path", "")), root))}</span>', esc(s.get("reason", ""))]
                for s in shown if isinstance(s, dict)]
        body.append(f"<h3>Skipped files ({len(skipped)})</h3>" + table(["file", "reason"], rows)
                    + (f'<p class="note">… and {len(skipped) - len(shown)} more in data.json</p>' if len(skipped) > len(shown) else ""))
    elif isinstance(skipped, list):
        body.append('<p class="note">No files were skipped: every image could be read.</p>')
    return _section(doc, "data", "Data", "".join(body))


# --------------------------------------------------------------------------------- scoring
def _datl_files(run: Run) -> dict[str, tuple[list[str], Any, Any]]:
    """{model label: (source class names, w, p_t)} from ``datl/*.npz``."""
    import numpy as np

    out = {}
    for path in sorted(run.dir.glob("datl/*.npz")):
        try:
            with np.load(path, allow_pickle=False) as z:
                label = str(z["model"]) if "model" in z.files else path.stem
                names = [str(n) for n in z["class_names"]] if "class_names" in z.files else None
                w = np.asarray(z["w"], dtype=np.float64)
                p_t = np.asarray(z["p_t"], dtype=np.float64) if "p_t" in z.files else None
        except Exception as exc:  # noqa: BLE001
            run.problems.append(f"datl/{path.name}: cannot be read ({type(exc).__name__})")
            continue
        if names is None or len(names) != w.size:
            names = [str(i) for i in range(w.size)]
        out[label] = (names, w, p_t)
        out.setdefault(path.stem, out[label])
    return out


def _top_from_npz(names, w, p_t, k: int) -> list[dict]:
    import numpy as np

    order = np.argsort(-w, kind="stable")[:k]
    return [{"name": names[i], "w": float(w[i]), "p_t": float(p_t[i]) if p_t is not None else None} for i in order]


def scoring_section(doc: Doc) -> str:
    run = doc.run
    sc = run.scoring or {}
    npz = _datl_files(run)
    models = [m for m in sc.get("models") or [] if isinstance(m, dict)]
    if not models and not npz:
        return _omitted("scoring", "Source models", "not in this run: no scoring.json or datl/*.npz (rank candidate models with "
                        "<code>autotl score DATA --model A --model B --out RUN_DIR</code>)")
    body = []
    used = run.model_name
    if models:
        rule = sc.get("rule") or {}
        body.append(f'<p class="note">Ranked by <b>{esc(rule.get("name", "?"))}</b>: {esc(rule.get("how", ""))}. '
                    f'{esc(sc.get("note", ""))}. Higher is better for every score.</p>')
        rows, rcls = [], []
        for m in models:
            s = m.get("scores") or {}
            params = m.get("params")
            rows.append([str(m.get("rank", "")), esc(m.get("model")) + (" <b>(used)</b>" if m.get("model") == used else ""),
                         esc(m.get("weights_origin", "")), esc(m.get("input_size", "")),
                         f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else "-",
                         num(s.get("datl"), 3), num(s.get("logme"), 3), num(s.get("leep"), 3), num(s.get("hscore"), 3),
                         num(m.get("mean_rank"), 3)])
            rcls.append("best" if m.get("model") == used else "")
        body.append('<div class="wrap">' + table(["rank", "model", "weights", "input", "params", "DATL KL", "LogME", "LEEP",
                                                  "H-score", "mean rank"], rows, row_classes=rcls,
                                                 numeric=(0, 3, 4, 5, 6, 7, 8, 9)) + "</div>")
    # DATL: what each source model thinks the target images are
    blocks = []
    labels = [m.get("model") for m in models] or list(npz)  # npz maps label and file stem to the same arrays
    seen = set()
    for label in labels:
        m = next((x for x in models if x.get("model") == label), {})
        datl = m.get("datl") or {}
        src = npz.get(label) or npz.get(Path(str(datl.get("weights_file", ""))).stem)
        if src is not None:
            if id(src) in seen:
                continue
            seen.add(id(src))
            top = _top_from_npz(*src, DATL_TOP)
        else:
            top = list(datl.get("top_classes") or [])[:DATL_TOP]
        if not top:
            blocks.append(f'<div><h3>{esc(label)}</h3><p class="note">no source classifier: no DATL weights</p></div>')
            continue
        wmax = max(float(t.get("w") or 0) for t in top) or 1.0
        rows = [[esc(t.get("name")), bar(float(t.get("w") or 0) / wmax, num(t.get("w"), 3)),
                 num(t.get("p_t"), 3) if t.get("p_t") is not None else "-"] for t in top]
        extra = []
        if datl.get("score") is not None:
            extra.append(f"KL(P_t‖P_s) {num(datl['score'], 3)} nats")
        if datl.get("top_mass_10") is not None:
            extra.append(f"top-10 mass {pct(datl['top_mass_10'])}")
        if datl.get("prior"):
            extra.append(f"P_s: {esc(datl['prior'])}")
        blocks.append(f'<div><h3>{esc(label)}</h3>' + (f'<p class="note">{" · ".join(extra)}</p>' if extra else "")
                      + table(["source class", "w(y) = P_t(y) / P_s(y)", "P_t(y)"], rows, numeric=(2,)) + "</div>")
    if blocks:
        body.append("<h3>What each source model sees in your images (DATL weights: top source classes by w(y))</h3>"
                    f'<div class="twocol">{"".join(blocks)}</div>')
    return _section(doc, "scoring", "Source models", "".join(body))


# ---------------------------------------------------------------------------------- search
def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={value_text(v)}" for k, v in params.items())


def search_section(doc: Doc) -> str:
    run = doc.run
    search = run.search or {}
    t0 = time.perf_counter()
    trials = _study.load_trials(run.dir, search, run.leaderboard or search.get("leaderboard"))
    doc.timings["study"] = time.perf_counter() - t0
    if trials is None:
        return _omitted("search", "Search", "not in this run: one strategy was trained without a search (search with "
                        "<code>autotl fit DATA --trials N</code>)")
    body = []
    objective = search.get("objective") or "value"
    items = []
    if search.get("recipe"):
        items.append(("recipe", esc(search["recipe"]) + (f' <span class="sub mono">({esc(search.get("recipe_source"))})</span>'
                                                          if search.get("recipe_source") else "")))
    items.append(("objective", f"validation {esc(objective)}" + (f" ({esc(search['objective_reason'])})"
                                                                  if search.get("objective_reason") else "")))
    states: dict[str, int] = {}
    for r in trials.rows:
        states[r["state"].lower()] = states.get(r["state"].lower(), 0) + 1
    items.append(("trials", f"{len(trials.rows)} (" + ", ".join(f"{v} {k}" for k, v in states.items()) + ")"
                  + (f"; {esc(search['trials_requested'])} requested" if search.get("trials_requested") else "")))
    if search.get("stopped_by"):
        items.append(("stopped by", esc(search["stopped_by"]) + (" (resumed study)" if search.get("resumed") else "")))
    if search.get("search_seconds") is not None:
        items.append(("search time", seconds(search["search_seconds"])))
    if search.get("candidates"):
        items.append(("candidate models", esc(", ".join(map(str, search["candidates"])))))
    items.append(("trials read from", esc(trials.source)))
    if search.get("dashboard"):
        items.append(("dashboard", f'<code>{esc(search["dashboard"])}</code>'))
    body.append(kv_list(items))
    body += [f'<p class="note">{esc(n)}</p>' for n in trials.notes]
    best_no = (search.get("best") or {}).get("number")
    models = {str((r.get("params") or {}).get("model")) for r in trials.rows if (r.get("params") or {}).get("model") is not None}
    hide = {"model"} if len(models) == 1 and len(search.get("candidates") or models) == 1 else set()
    if hide:
        body.append(f'<p class="note">Every trial used source model {esc(next(iter(models)))} (the only candidate).</p>')
    if trials.rows:
        rows, rcls = [], []
        for rank, r in enumerate(trials.rows[:MAX_TRIAL_ROWS], start=1):
            state = r["state"].lower() + (" *" if r.get("baseline") else "") + (" (interrupted)" if r.get("interrupted") else "")
            params = {k: v for k, v in (r.get("params") or {}).items() if k not in hide}
            ptext = esc(_params_text(params))
            if r.get("error"):
                ptext += f'<br><span class="fail">{esc(str(r["error"])[:200])}</span>'
            rows.append([str(rank), str(r["number"]) + (" ★" if r["number"] == best_no else ""), esc(state),
                         num(r.get("value")), seconds(r.get("seconds")), esc(r.get("epochs_run") or "-"),
                         f'<div class="params">{ptext}</div>'])
            rcls.append("best" if r["number"] == best_no else ("dim" if r["state"] != "COMPLETE" else ""))
        body.append("<h3>Trial leaderboard</h3>" + '<div class="wrap">'
                    + table(["#", "trial", "state", f"val {objective}", "duration", "epochs", "parameters"], rows,
                            row_classes=rcls, numeric=(0, 1, 3, 4, 5)) + "</div>")
        notes = ["★: the trial refit as the final model"] if best_no is not None else []
        if any(r.get("baseline") for r in trials.rows):
            notes.append("*: enqueued baseline (what plain <code>autotl fit</code> trains)")
        if len(trials.rows) > MAX_TRIAL_ROWS:
            notes.append(f"{len(trials.rows) - MAX_TRIAL_ROWS} more trial(s) in leaderboard.json")
        if notes:
            body.append(f'<p class="note">{"; ".join(notes)}</p>')
    t0 = time.perf_counter()
    body.append(_search_plots(doc, trials, objective))
    doc.timings["plots"] = time.perf_counter() - t0
    return _section(doc, "search", "Search", "".join(body))


def _search_plots(doc: Doc, trials: _study.Trials, objective: str) -> str:
    use_plotly = doc.plots != "svg" and trials.study is not None and _study.plotly_available()
    if doc.plots == "plotly" and not use_plotly:
        why = "plotly is not installed" if not _study.plotly_available() else "the study could not be opened"
        notes = [f"plotly plots unavailable ({why}): static plots instead"]
    else:
        notes = []
    if use_plotly:
        figs, fnotes = _study.plotly_figures(trials.study)
        if figs:
            doc.needs_plotly = True
            wide = {"parallel_coordinate", "intermediate_values"}
            cells = "".join(f'<div class="plot{" wide" if key in wide else ""}"><h3>{esc(title)}</h3>{div}</div>'
                            for key, title, div in figs)
            return ("<h3>Optuna plots</h3>" + "".join(f'<p class="note">{esc(n)}</p>' for n in notes + fnotes)
                    + f'<div class="plots">{cells}</div>')
        notes += fnotes
    # static SVG from the trial rows
    cells = []
    done = [r for r in trials.rows if r["state"] == "COMPLETE" and _float(r.get("value")) is not None]
    scored = sorted([r for r in trials.rows if _float(r.get("value")) is not None], key=lambda r: r["number"])
    if scored:
        best_so_far, best, xs = [], -math.inf, []
        for r in scored:
            if r["state"] == "COMPLETE":
                best = max(best, float(r["value"]))
            xs.append(r["number"])
            best_so_far.append(best if math.isfinite(best) else None)
        colors = ["#2b6cb0" if r["state"] == "COMPLETE" else "#a0aec0" for r in scored]
        tips = [f'trial {r["number"]} ({r["state"].lower()}): {float(r["value"]):.4g}; {_params_text(r.get("params") or {})}'
                for r in scored]
        chart = _charts.line_chart([
            _charts.Series("trial value (grey: pruned, last epoch)", xs, [float(r["value"]) for r in scored], mode="markers",
                           marker_colors=colors, tips=tips),
            _charts.Series("best so far", xs, best_so_far, color="#c53030", mode="step"),
        ], x_label="trial", y_label=f"val {objective}", width=540, height=280)
        cells.append(f'<div class="plot"><h3>Optimisation history</h3>{chart}</div>')
    imp = _study.param_importances(trials.study) if trials.study is not None and len(done) >= 2 else None
    if imp:
        top = max(imp.values()) or 1.0
        rows = [[esc(k), bar(v / top, f"{v:.3f}")] for k, v in sorted(imp.items(), key=lambda kv: -kv[1])]
        cells.append('<div class="plot"><h3>Parameter importance (fANOVA)</h3>'
                     + table(["parameter", "importance"], rows) + "</div>")
    elif trials.study is not None:
        notes.append("parameter importance needs at least two completed trials with varying parameters")
    params = list(dict.fromkeys(k for r in done for k in (r.get("params") or {})))
    varied = [k for k in params if len({repr((r.get("params") or {}).get(k)) for r in done}) > 1]
    params = varied or params  # an axis every trial shares says nothing
    pc = _charts.parallel_coordinates([{"params": r.get("params") or {}, "value": r["value"], "number": r["number"]}
                                       for r in done], params, objective=f"val {objective}")
    if pc:
        cells.append(f'<div class="plot wide"><h3>Parallel coordinates (completed trials; darker = better)'
                     f"</h3>{pc}</div>")
    if not cells:
        return "".join(f'<p class="note">{esc(n)}</p>' for n in notes + ["no scored trial yet: no plots"])
    return ("<h3>Search plots</h3>" + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
            + f'<div class="plots">{"".join(cells)}</div>')


# ------------------------------------------------------------------------------ evaluation
def per_class(confusion: list[list[float]]) -> list[dict[str, float | None]]:
    """Precision / recall / F1 / support per class from a confusion matrix (rows: true, cols: predicted)."""
    k = len(confusion)
    out = []
    for i in range(k):
        tp = float(confusion[i][i])
        support = float(sum(confusion[i]))
        predicted = float(sum(confusion[r][i] for r in range(k)))
        p = tp / predicted if predicted else None
        r = tp / support if support else None
        f1 = (2 * p * r / (p + r) if (p + r) else 0.0) if p is not None and r is not None else None
        out.append({"precision": p, "recall": r, "f1": f1, "support": int(support)})
    return out


def _cell_style(frac: float, diag: bool) -> str:
    if frac <= 0:
        return ""
    rgb = "47,133,90" if diag else "197,48,48"
    fg = "color:#fff;" if frac > 0.55 else ""
    return f' style="background:rgba({rgb},{0.12 + 0.78 * frac:.2f});{fg}"'


def confusion_html(confusion: list[list[float]], classes: list[str]) -> str:
    k = len(confusion)
    names = classes if len(classes) == k else [str(i) for i in range(k)]
    if k > MAX_CONFUSION_TABLE:
        img = _charts.heatmap_png(confusion, cell=max(2, min(8, 600 // k)))
        pairs = sorted(((confusion[i][j], i, j) for i in range(k) for j in range(k) if i != j and confusion[i][j]),
                       reverse=True)[:12]
        rows = [[esc(names[i]), esc(names[j]), str(int(n))] for n, i, j in pairs]
        return (f'<p class="note">{k} classes: the matrix as a heat map (rows: true class, columns: predicted, row-normalised; '
                f'class order as in the card), and the most frequent confusions.</p>'
                f'<img src="{png_data_uri(img)}" alt="confusion matrix heat map" style="image-rendering:pixelated;'
                f'border:1px solid #dde2e8;max-width:100%">'
                + (table(["true class", "predicted as", "images"], rows, numeric=(2,)) if rows else
                   '<p class="note">no confusions</p>'))
    head = ('<tr><th class="cm-axis">true ↓ / predicted →</th>'
            + "".join(f'<th class="colh" title="{esc(n)}">{esc(n)}</th>' for n in names) + "</tr>")
    body = []
    for i in range(k):
        total = sum(confusion[i]) or 1
        cells = []
        for j in range(k):
            v = confusion[i][j]
            tip = esc(f"true {names[i]} → predicted {names[j]}: {int(v)} ({100 * v / total:.1f}% of {names[i]})")
            cells.append(f'<td{_cell_style(v / total, i == j)} title="{tip}">{int(v)}</td>')
        body.append(f'<tr><th class="rowh" title="{esc(names[i])}">{esc(names[i])}</th>{"".join(cells)}</tr>')
    return f'<div class="wrap"><table class="confusion"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table></div>'


def evaluation_section(doc: Doc) -> str:
    run = doc.run
    metrics = {k: v for k, v in run.metrics.items() if isinstance(v, dict) and v}
    if not metrics:
        return _omitted("evaluation", "Evaluation", "not in this run: no metrics in result.json / model.json")
    classes = run.classes
    body = []
    what = {"val": "Validation split (used for early stopping and model selection)",
            "test": "Test split (held out: reported only, never used for a decision)"}
    for split in sorted(metrics, key=lambda s: {"val": 0, "test": 1}.get(s, 2)):
        m = metrics[split]
        title = what.get(split, split) + (f" — {m['n']} images" if m.get("n") is not None else "")
        cards = [("accuracy", pct(m.get("accuracy"), 2)), ("macro-F1", pct(m.get("macro_f1"), 2)),
                 ("loss", num(m.get("loss"), 3))]
        part = [f"<h3>{esc(title)}</h3>", _cards(cards)]
        conf = m.get("confusion")
        if isinstance(conf, list) and conf and all(isinstance(r, list) for r in conf):
            pcs = per_class(conf)
            names = classes if len(classes) == len(conf) else [str(i) for i in range(len(conf))]
            rows = [[esc(n), num(p["precision"], 3), num(p["recall"], 3), num(p["f1"], 3), str(p["support"])]
                    for n, p in zip(names, pcs)]
            macro = [sum(p[k] or 0.0 for p in pcs) / len(pcs) for k in ("precision", "recall", "f1")]
            rows.append(["macro average", *(num(x, 3) for x in macro), str(sum(p["support"] for p in pcs))])
            per = table(["class", "precision", "recall", "F1", "support"], rows, numeric=(1, 2, 3, 4),
                        row_classes=[""] * len(pcs) + ["total"])
            part.append(f'<div class="twocol"><div>{confusion_html(conf, classes)}</div><div class="wrap">{per}</div></div>')
        else:
            part.append('<p class="note">no confusion matrix recorded (result.json missing or written by an older autotl)</p>')
        body.append("".join(part))
    return _section(doc, "evaluation", "Evaluation of the final model", "".join(body))


# --------------------------------------------------------------------------------- dropout
def dropout_section(doc: Doc) -> str:
    run = doc.run
    rows = _read_csv(run, "dropped.csv")
    info = ((run.strategy.get("strategies") or {}).get("dropout")) if isinstance(run.strategy.get("strategies"), dict) else None
    if rows is None:
        return _omitted("dropout", "Data dropout", "not in this run: no dropped.csv (data dropout was not used; try "
                        "<code>autotl dropout DATA</code> or a recipe with <code>dropout_tau</code>)")
    body = []
    if isinstance(info, dict) and info:
        per = info.get("dropped_per_class") or {}
        items = [("dropped", esc(f'{info.get("n_dropped", len(rows))} of {info.get("n_total", "?")} training images')),
                 ("threshold", esc(f'tau {value_text(info.get("tau"))} ({info.get("mode")}) → influence > '
                                   f'{value_text(info.get("threshold"))}'))]
        if per:
            items.append(("per class", esc(", ".join(f"{k}: {v}" for k, v in per.items()))))
        if info.get("decided_by"):
            items.append(("decided by", esc(info["decided_by"])))
        body.append(kv_list(items))
    body.append('<p class="note">Influence: the predicted drop of the validation loss if the image is removed from training '
                '(positive = harmful; σ = robust spreads). Labels in <span class="mismatch">red</span>: the model predicts '
                'another class than the folder says — likely mislabelled.</p>')
    if not rows:
        body.append('<p class="note">dropped.csv is empty: no image was dropped.</p>')
        return _section(doc, "dropout", "Data dropout", "".join(body))
    figs = []
    root = run.data_root
    for r in rows[:MAX_DROPPED]:
        given, pred = r.get("given_label", ""), r.get("predicted_label", "")
        mism = bool(pred) and pred != given
        pred_html = f'<span class="mismatch">{esc(pred)}</span>' if mism else esc(pred)
        infl = _float(r.get("influence"))
        spreads = _float(r.get("influence_spreads"))
        pg = _float(r.get("prob_given"))
        cap = (f'#{esc(r.get("rank", ""))} <b>{esc(given)}</b> → {pred_html}<br>'
               + (f"infl {infl:.3g}" if infl is not None else "")
               + (f" ({spreads:.1f}σ)" if spreads is not None else "")
               + (f"<br>p(given) {pg:.2f}" if pg is not None else ""))
        path = r.get("path", "")
        figs.append(doc.thumbs.figure(path, cap, title=short_path(path, root)))
    body.append(f'<div class="grid">{"".join(figs)}</div>')
    if len(rows) > MAX_DROPPED:
        body.append(f'<p class="note">showing the {MAX_DROPPED} most harmful of {len(rows)} dropped images; all are listed '
                    "in dropped.csv (every training image with its influence in influence.csv)</p>")
    return _section(doc, "dropout", "Data dropout", "".join(body))


# ------------------------------------------------------------------------------- retrieval
def retrieval_section(doc: Doc) -> str:
    run = doc.run
    rows = _read_csv(run, "retrieval.csv")
    if rows is None:
        return _omitted("retrieval", "Retrieved neighbours", "not in this run: no retrieval.csv (selective joint fine-tuning "
                        "with a source pool was not used)")
    info = (run.strategy.get("strategies") or {}).get("retrieval") if isinstance(run.strategy.get("strategies"), dict) else None
    body = []
    targets: dict[str, dict] = {}
    pool_images = set()
    for r in rows:
        t = targets.setdefault(r.get("target_path", ""), {"class": r.get("target_class", ""), "nbrs": []})
        t["nbrs"].append(r)
        pool_images.add(r.get("pool_path"))
    items = []
    if isinstance(info, dict) and info:
        if info.get("pool"):
            items.append(("source pool", f'<span class="mono">{esc(info["pool"])}</span>'
                          + (f' ({esc(info.get("pool_images"))} images, {esc(info.get("pool_classes"))} classes)'
                             if info.get("pool_images") is not None else "")))
        for key, label in (("bank", "filter bank"), ("k0", "K0 (initial neighbours)"), ("rounds_run", "rounds"),
                           ("mode", "mode"), ("source_weights", "source weights")):
            if info.get(key) is not None:
                items.append((label, esc(value_text(info[key]))))
    items.append(("in retrieval.csv", f"{len(targets)} target images, {len(rows)} (target, neighbour) pairs, "
                  f"{len(pool_images)} distinct pool images"))
    body.append(kv_list(items))
    if not targets:
        body.append('<p class="note">retrieval.csv is empty: no neighbour was used.</p>')
        return _section(doc, "retrieval", "Retrieved neighbours", "".join(body))
    # a few targets, spread over the target classes (round-robin in file order)
    by_class: dict[str, list[str]] = {}
    for path, t in targets.items():
        by_class.setdefault(t["class"], []).append(path)
    picked: list[str] = []
    while len(picked) < MAX_TARGETS and any(by_class.values()):
        for c in list(by_class):
            if by_class[c] and len(picked) < MAX_TARGETS:
                picked.append(by_class[c].pop(0))
    body.append('<p class="note">Each row: a target training image (blue frame) and its nearest source-pool images by the '
                "filter-bank descriptor distance (rank, pool class, distance; round = when the hard-sample schedule added it).</p>")
    root = run.data_root
    pool_root = info.get("pool") if isinstance(info, dict) else None
    for path in picked:
        t = targets[path]
        nbrs = sorted(t["nbrs"], key=lambda r: int(_float(r.get("rank")) or 0))[:MAX_NEIGHBOURS]
        cells = [doc.thumbs.figure(path, f'<b>{esc(t["class"])}</b><br><span class="sub">{esc(Path(path).name)}</span>',
                                   title=short_path(path, root), cls="target"), '<div class="arrow">→</div>']
        for r in nbrs:
            d = _float(r.get("distance"))
            cap = (f'#{esc(r.get("rank"))} {esc(r.get("pool_class"))}<br>'
                   + (f"d {d:.3g}" if d is not None else "") + (f' · round {esc(r.get("round"))}' if r.get("round") else ""))
            cells.append(doc.thumbs.figure(r.get("pool_path", ""), cap, title=short_path(r.get("pool_path", ""), pool_root)))
        more = len(t["nbrs"]) - len(nbrs)
        if more > 0:
            cells.append(f'<div class="arrow sub" style="font-size:12px">+{more} more</div>')
        body.append(f'<div class="nbrow">{"".join(cells)}</div>')
    if len(targets) > len(picked):
        body.append(f'<p class="note">{len(picked)} of {len(targets)} target images shown; all pairs are in retrieval.csv</p>')
    return _section(doc, "retrieval", "Retrieved neighbours", "".join(body))


# ------------------------------------------------------------------------------------ onnx
def onnx_section(doc: Doc) -> str:
    run = doc.run
    parity = run.parity
    onnx = run.dir / "model.onnx"
    if not parity and not onnx.is_file():
        return _omitted("onnx", "ONNX export", "not in this run: no model.onnx / parity check")
    items = []
    if parity:
        ok = parity.get("passed")
        items.append(("parity check", '<span class="ok">passed</span>' if ok else '<span class="fail">failed</span>'))
        items.append(("images compared", esc(parity.get("n_images", "-"))))
        mad, atol = parity.get("max_abs_diff"), parity.get("atol")
        items.append(("max |logit difference| ONNX vs PyTorch", f"{num(mad)}" + (f" (tolerance {num(atol)})" if atol else "")))
        if parity.get("argmax_agree") is not None:
            items.append(("same predicted class", ("all images" if parity.get("argmax_agree")
                                                   else f'<span class="fail">{esc(parity.get("argmax_mismatches"))} '
                                                        "mismatches</span>")))
    if onnx.is_file():
        items.append(("model.onnx", f"{onnx.stat().st_size / 2 ** 20:.1f} MiB"))
    pre = (run.card or {}).get("preprocessing") or {}
    if pre:
        size = pre.get("input_size")
        items.append(("preprocessing", esc(
            f"resize ({pre.get('interpolation')}) and {pre.get('crop_mode', 'center')} crop to "
            f"{'×'.join(map(str, size[-2:])) if isinstance(size, list) else size} (crop_pct {pre.get('crop_pct')}), "
            f"normalise mean {value_text(pre.get('mean'))} std {value_text(pre.get('std'))}")))
    items.append(("use it", f'<code>autotl predict {esc(onnx)} IMAGES…</code> (onnxruntime only; model.json beside it)'))
    return _section(doc, "onnx", "ONNX export", kv_list(items))


# ---------------------------------------------------------------------------------- driver
SECTIONS: tuple[Callable[[Doc], str], ...] = (strategy_section, data_section, scoring_section, search_section,
                                              evaluation_section, dropout_section, retrieval_section, onnx_section)


def build_html(run: Run, *, plots: str = "auto") -> tuple[str, Doc]:
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
            parts.append(_omitted(name, name.capitalize(), f"could not be rendered ({esc(type(exc).__name__)}: "
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
    if plots not in PLOT_MODES:
        raise AutotlError(f"--plots {plots!r}: use one of {', '.join(PLOT_MODES)}")
    run = load_run(run_dir)
    html_doc, _ = build_html(run, plots=plots)
    path = Path(out) if out is not None else run.dir / REPORT_NAME
    return atomic_write_text(path, html_doc)
