"""The best strategy in words, its settings, which split decided what, and the final training curve."""

from __future__ import annotations

from . import _charts
from ._doc import Doc, finite_float, omitted, section
from ._html import esc, kv_list, num, value_text


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
    parts += strategy_notes(strategy)
    return "; ".join(parts)


def strategy_notes(strategy: dict) -> list[str]:
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
    s = run.training
    if not s:
        return omitted("strategy", "Best strategy", "not in this run: no model.json / result.json")
    body = [f'<div class="words">{esc(strategy_words(s, run.model_name))}</div>']
    search = run.search or {}
    best = search.get("best") or {}
    if best:
        refit_on = search.get("refit_on") or ("train + val" if search.get("refit_on_val") else "train")
        body.append(f'<p class="note">Chosen by the search: trial {esc(best.get("number"))} with {run.trial_score} '
                    f'{esc(search.get("objective", "score"))} {num(best.get("value"))}; refit on {esc(refit_on)}.</p>')
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
    refit = search.get("refit") if isinstance(search.get("refit"), dict) else None
    if refit and refit.get("epochs") is not None:  # a fixed epoch count from the folds: nothing stopped early
        chosen = f" (best epoch {int(refit['best_epoch']) + 1} on the folds' decision parts)" if refit.get("best_epoch") is not None else ""
        items.append(("refit", esc(f"{refit['epochs']} epoch(s) on {search.get('refit_on') or 'all labelled images'}, "
                                   f"no early stopping{chosen}")))
    elif s.get("best_epoch") is not None and not run.refit_on_val:
        ran = len(run.history) if run.history else None
        items.append(("best epoch", f"{int(s['best_epoch']) + 1}" + (f" of {ran} run (early stopping on val)" if ran else "")))
    reg = s.get("regularizer") or "none"
    items.append(("regulariser", "none" if reg == "none" else esc(f"{reg} λ={value_text(s.get('reg_lambda'))}"
                                                                  + (" + DTNH" if s.get("dtnh") else ""))))
    if s.get("cached_prefix") is not None:
        items.append(("frozen prefix cached", "yes" if s["cached_prefix"] else "no"))
    for note in strategy_notes(s):
        items.append(("strategy", esc(note)))
    decided = ((run.card or {}).get("extra") or {}).get("decided_by") or {}
    left = kv_list(items)
    right = ""
    if decided:
        right = "<h3>Which split decided what</h3>" + kv_list((k.replace("_", " "), esc(v)) for k, v in decided.items())
    body.append(f'<div class="twocol"><div>{left}</div><div>{right}</div></div>')
    trained_on_val = run.trained_on("val")
    chart = history_chart(run.history or [], val_held_out=not trained_on_val)
    if chart:
        note = ('<p class="note">Training loss only: the final model trained on val, so its val curves would not '
                "show how it does on new images.</p>" if trained_on_val else "")
        body.append(f"<h3>Training of the final model</h3>{note}{chart}")
    return section(doc, "strategy", "Best strategy", "".join(body))


def history_chart(history: list, *, val_held_out: bool = True) -> str:
    """Loss (and val scores) per epoch of the final model; ``val_held_out=False`` (it trained on val):
    the training loss alone."""
    rows = [h for h in history if isinstance(h, dict) and h.get("epoch") is not None]
    if not rows:
        return ""
    xs = [int(h["epoch"]) + 1 for h in rows]
    series = [_charts.Series("train loss", xs, [finite_float(h.get("train_loss")) for h in rows], mode="both")]
    if not val_held_out:
        return _charts.line_chart(series, x_label="epoch", y_label="loss", width=720, height=260)
    series.append(_charts.Series("val loss", xs, [finite_float(h.get("val_loss")) for h in rows], mode="both"))
    if any(h.get("accuracy") is not None for h in rows):
        series.append(_charts.Series("val accuracy", xs, [finite_float(h.get("accuracy")) for h in rows], mode="both",
                                     dashed=True, right_axis=True))
    if any(h.get("macro_f1") is not None for h in rows):
        series.append(_charts.Series("val macro-F1", xs, [finite_float(h.get("macro_f1")) for h in rows], mode="line",
                                     dashed=True, right_axis=True))
    return _charts.line_chart(series, x_label="epoch", y_label="loss", y2_label="score", width=720, height=260)
