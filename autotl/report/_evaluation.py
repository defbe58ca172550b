"""The evaluation section: accuracy, macro-F1, confusion matrices and per-class metrics per split."""

from __future__ import annotations

from ..card import estimate_line
from . import _charts
from ._doc import Doc, omitted, section, summary_cards
from ._html import esc, num, pct, png_data_uri, table

MAX_CONFUSION_TABLE = 25  # classes; above this the confusion matrix is a heat-map image


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


LEGACY_TITLES = {"val": "Validation split (used for early stopping and model selection)",
                 "test": "Test split (held out: reported only, never used for a decision)"}


def split_title(split: str, role: str | None) -> str:
    """A split's heading, named for what its figures are: trained on, or held out (``role``)."""
    if not role:
        return LEGACY_TITLES.get(split, split)
    if role.startswith("trained on"):
        return f"{split} split, {role}"  # not "validation": the model learnt these images
    name = {"val": "Validation split", "test": "Test split"}.get(split, f"{split} split")
    return f"{name} ({role})"


def evaluation_section(doc: Doc) -> str:
    run = doc.run
    metrics = {k: v for k, v in run.metrics.items() if isinstance(v, dict) and v}
    if not metrics:
        return omitted("evaluation", "Evaluation", "not in this run: no metrics in result.json / model.json")
    classes = run.classes
    body = []
    est = run.estimate
    if est:
        body.append(f'<p class="words">Estimate for new images: {esc(estimate_line(est))}</p>'
                    + (f'<p class="note">{esc(est.get("method"))}</p>' if est.get("method") else ""))
    for split in sorted(metrics, key=lambda s: {"val": 0, "test": 1}.get(s, 2)):
        m = metrics[split]
        title = split_title(split, run.role(split)) + (f" — {m['n']} images" if m.get("n") is not None else "")
        cards = [("accuracy", pct(m.get("accuracy"), 2)), ("macro-F1", pct(m.get("macro_f1"), 2)),
                 ("loss", num(m.get("loss"), 3))]
        part = [f"<h3>{esc(title)}</h3>", summary_cards(cards)]
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
    return section(doc, "evaluation", "Evaluation of the final model", "".join(body))
