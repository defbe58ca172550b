"""The search section: recipe, objective, trial leaderboard and the optimisation plots."""

from __future__ import annotations

import math
import time

from . import _charts, _study
from ._doc import Doc, finite_float, omitted, section
from ._html import bar, esc, kv_list, num, seconds, table, value_text

MAX_TRIAL_ROWS = 60


def score_cell(row: dict) -> str:
    """A trial's score: "mean ± std" over its cross-validation folds when the row has a std, else the value."""
    std = finite_float(row.get("value_std"))
    if std is None or finite_float(row.get("value")) is None:
        return num(row.get("value"))
    return f"{num(row['value'])} ± {num(std, 2)}"


def _folds_note(rows: list[dict]) -> str | None:
    folds = {r.get("n_folds") for r in rows if finite_float(r.get("value_std")) is not None}
    if not folds:
        return None
    k = next(iter(folds)) if len(folds) == 1 else None
    return ("value ± std: mean and standard deviation of the trial's score over "
            + (f"{esc(k)} cross-validation folds" if k is not None else "its cross-validation folds"))


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={value_text(v)}" for k, v in params.items())


def search_section(doc: Doc) -> str:
    run = doc.run
    search = run.search or {}
    t0 = time.perf_counter()
    trials = _study.load_trials(run.dir, search, run.leaderboard or search.get("leaderboard"))
    doc.timings["study"] = time.perf_counter() - t0
    if trials is None:
        return omitted("search", "Search", "not in this run: one strategy was trained without a search (search with "
                        "<code>autotl fit DATA --trials N</code>)")
    body = []
    objective = search.get("objective") or "value"
    items = []
    if search.get("recipe"):
        items.append(("recipe", esc(search["recipe"]) + (f' <span class="sub mono">({esc(search.get("recipe_source"))})</span>'
                                                          if search.get("recipe_source") else "")))
    score = run.trial_score  # what a trial's value is: cross-validated, held out (holdout) or a val score
    items.append(("objective", f"{esc(score)} {esc(objective)}" + (f" ({esc(search['objective_reason'])})"
                                                                    if search.get("objective_reason") else "")))
    ranking = ((search.get("selection") or {}).get("decided_by") or {}).get("trial_ranking")
    if ranking:
        items.append(("trials scored by", esc(ranking)))
    states: dict[str, int] = {}
    for r in trials.rows:
        states[r["state"].lower()] = states.get(r["state"].lower(), 0) + 1
    items.append(("trials", f"{len(trials.rows)} (" + ", ".join(f"{v} {k}" for k, v in states.items()) + ")"
                  + (f"; {esc(search['trials_requested'])} requested" if search.get("trials_requested") else "")))
    if search.get("stopped_by"):
        items.append(("stopped by", esc(search["stopped_by"]) + (" (resumed study)" if search.get("resumed") else "")))
    if search.get("search_seconds") is not None:
        items.append(("search time", seconds(search["search_seconds"])))
    for change in search.get("schedule") or []:
        items.append((f"after {change['after_trials']} trials", esc(change["why"])))
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
                         score_cell(r), seconds(r.get("seconds")), esc(r.get("epochs_run") or "-"),
                         f'<div class="params">{ptext}</div>'])
            rcls.append("best" if r["number"] == best_no else ("dim" if r["state"] != "COMPLETE" else ""))
        body.append("<h3>Trial leaderboard</h3>" + '<div class="wrap">'
                    + table(["#", "trial", "state", f"{score} {objective}", "duration", "epochs", "parameters"], rows,
                            row_classes=rcls, numeric=(0, 1, 3, 4, 5)) + "</div>")
        notes = ["★: the trial refit as the final model"] if best_no is not None else []
        if any(r.get("baseline") for r in trials.rows):
            notes.append("*: enqueued baseline (what plain <code>autotl fit</code> trains)")
        folds = _folds_note(trials.rows[:MAX_TRIAL_ROWS])
        if folds:
            notes.append(folds)
        if len(trials.rows) > MAX_TRIAL_ROWS:
            notes.append(f"{len(trials.rows) - MAX_TRIAL_ROWS} more trial(s) in leaderboard.json")
        if notes:
            body.append(f'<p class="note">{"; ".join(notes)}</p>')
    body.append(_ensemble_block(search.get("ensemble")))
    t0 = time.perf_counter()
    body.append(_search_plots(doc, trials, f"{score} {objective}"))
    doc.timings["plots"] = time.perf_counter() - t0
    return section(doc, "search", "Search", "".join(body))


def _ensemble_block(ens: dict | None) -> str:
    """What greedy ensemble selection chose (or why the single trial was kept)."""
    if not ens:
        return ""
    if not ens.get("used"):
        return f'<h3>Ensemble</h3><p class="note">Not used: {esc(ens.get("reason") or "-")}.</p>'
    rows = [[esc(m["trial"]), esc(m["picks"]), num(m["weight"])] for m in ens.get("members") or []]
    loss, obj = ens.get("oof_log_loss") or {}, ens.get("oof_objective") or {}
    return ("<h3>Ensemble</h3>" + table(["trial", "picks", "weight"], rows, numeric=(0, 1, 2))
            + f'<p class="note">Greedy selection with replacement on the out-of-fold probabilities of '
              f'{esc(ens.get("n_scored"))} scored images: log loss {num(loss.get("selected_trial"))} (selected trial) → '
              f'{num(loss.get("ensemble"))}, objective {num(obj.get("selected_trial"))} → {num(obj.get("ensemble"))}. '
              "These figures decided the ensemble: they are not held out.</p>")


def _search_plots(doc: Doc, trials: _study.Trials, score: str) -> str:
    """Optuna's plots (plotly) or static SVG ones; ``score``: what a trial's value is, e.g. "cross-validated accuracy"."""
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
    done = [r for r in trials.rows if r["state"] == "COMPLETE" and finite_float(r.get("value")) is not None]
    scored = sorted([r for r in trials.rows if finite_float(r.get("value")) is not None], key=lambda r: r["number"])
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
        ], x_label="trial", y_label=score, width=540, height=280)
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
                                       for r in done], params, objective=score)
    if pc:
        cells.append(f'<div class="plot wide"><h3>Parallel coordinates (completed trials; darker = better)'
                     f"</h3>{pc}</div>")
    if not cells:
        return "".join(f'<p class="note">{esc(n)}</p>' for n in notes + ["no scored trial yet: no plots"])
    return ("<h3>Search plots</h3>" + "".join(f'<p class="note">{esc(n)}</p>' for n in notes)
            + f'<div class="plots">{"".join(cells)}</div>')
