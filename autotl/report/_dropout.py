"""The data-dropout section: the dropped images (``dropped.csv``) as thumbnails with their influence."""

from __future__ import annotations

from ._doc import Doc, finite_float, omitted, section
from ._html import esc, kv_list, short_path, value_text
from ._run import read_csv

MAX_DROPPED = 24  # thumbnails of the most harmful dropped images


def dropout_section(doc: Doc) -> str:
    run = doc.run
    rows = read_csv(run, "dropped.csv")
    info = ((run.training.get("strategies") or {}).get("dropout")) if isinstance(run.training.get("strategies"), dict) else None
    if rows is None:
        return omitted("dropout", "Data dropout", "not in this run: no dropped.csv (data dropout was not used; try "
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
    body.append('<p class="note">Influence: the predicted drop of the loss on the reference images (the ones that decided: see '
                '“decided by”) if the image is removed from training (positive = harmful; σ = robust spreads). Labels in <span class="mismatch">red</span>: the model predicts '
                'another class than the folder says — likely mislabelled.</p>')
    if not rows:
        body.append('<p class="note">dropped.csv is empty: no image was dropped.</p>')
        return section(doc, "dropout", "Data dropout", "".join(body))
    figs = []
    root = run.data_root
    for r in rows[:MAX_DROPPED]:
        given, pred = r.get("given_label", ""), r.get("predicted_label", "")
        mism = bool(pred) and pred != given
        pred_html = f'<span class="mismatch">{esc(pred)}</span>' if mism else esc(pred)
        infl = finite_float(r.get("influence"))
        spreads = finite_float(r.get("influence_spreads"))
        pg = finite_float(r.get("prob_given"))
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
    return section(doc, "dropout", "Data dropout", "".join(body))
