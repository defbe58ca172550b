"""The retrieval section: target images beside their retrieved source-pool neighbours (``retrieval.csv``)."""

from __future__ import annotations

from pathlib import Path

from ._doc import Doc, finite_float, omitted, section
from ._html import esc, kv_list, short_path, value_text
from ._run import read_csv

MAX_TARGETS = 6  # target images shown with their retrieved neighbours
MAX_NEIGHBOURS = 6  # neighbours per target


def retrieval_section(doc: Doc) -> str:
    run = doc.run
    rows = read_csv(run, "retrieval.csv")
    if rows is None:
        return omitted("retrieval", "Retrieved neighbours", "not in this run: no retrieval.csv (selective joint fine-tuning "
                        "with a source pool was not used)")
    info = (run.training.get("strategies") or {}).get("retrieval") if isinstance(run.training.get("strategies"), dict) else None
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
        return section(doc, "retrieval", "Retrieved neighbours", "".join(body))
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
        nbrs = sorted(t["nbrs"], key=lambda r: int(finite_float(r.get("rank")) or 0))[:MAX_NEIGHBOURS]
        cells = [doc.thumbs.figure(path, f'<b>{esc(t["class"])}</b><br><span class="sub">{esc(Path(path).name)}</span>',
                                   title=short_path(path, root), cls="target"), '<div class="arrow">→</div>']
        for r in nbrs:
            d = finite_float(r.get("distance"))
            cap = (f'#{esc(r.get("rank"))} {esc(r.get("pool_class"))}<br>'
                   + (f"d {d:.3g}" if d is not None else "") + (f' · round {esc(r.get("round"))}' if r.get("round") else ""))
            cells.append(doc.thumbs.figure(r.get("pool_path", ""), cap, title=short_path(r.get("pool_path", ""), pool_root)))
        more = len(t["nbrs"]) - len(nbrs)
        if more > 0:
            cells.append(f'<div class="arrow sub" style="font-size:12px">+{more} more</div>')
        body.append(f'<div class="nbrow">{"".join(cells)}</div>')
    if len(targets) > len(picked):
        body.append(f'<p class="note">{len(picked)} of {len(targets)} target images shown; all pairs are in retrieval.csv</p>')
    return section(doc, "retrieval", "Retrieved neighbours", "".join(body))
