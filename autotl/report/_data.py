"""The data section: folder (and label file), split, images per class and split, skipped files."""

from __future__ import annotations

from ._doc import Doc, omitted, section
from ._html import bar, esc, kv_list, short_path, table

MAX_SKIPPED_ROWS = 100


def data_section(doc: Doc) -> str:
    run = doc.run
    ds = run.dataset
    if not ds:
        return omitted("data", "Data", "not in this run: no data.json / model.json")
    classes = [str(c) for c in ds.get("classes") or run.classes]
    counts = ds.get("counts") or {}
    root = run.data_root
    items = []
    if root:
        items.append(("folder", f'<span class="mono">{esc(root)}</span>'))
    label_file = ds.get("label_file") if isinstance(ds.get("label_file"), dict) else None
    if label_file:
        items.append(("label file", f'<span class="mono">{esc(str(label_file.get("path", "")))}</span> '
                                    f'(sha256 <span class="mono">{esc(str(label_file.get("sha256", ""))[:16])}</span>)'))
    split = ds.get("split")
    if split:
        given = "the label file's split column" if label_file else "train/ val/ [test/] folders as given"
        items.append(("split", esc({"folders": given}.get(split, split))))
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
    return section(doc, "data", "Data", "".join(body))
