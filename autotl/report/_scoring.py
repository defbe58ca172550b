"""The source-model section: the ranking from ``scoring.json`` and the DATL weights in ``datl/*.npz``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._doc import Doc, omitted, section
from ._html import bar, esc, num, pct, table
from ._run import RunFolder

DATL_TOP = 8


def _datl_files(run: RunFolder) -> dict[str, tuple[list[str], Any, Any]]:
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
        return omitted("scoring", "Source models", "not in this run: no scoring.json or datl/*.npz (rank candidate models with "
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
    return section(doc, "scoring", "Source models", "".join(body))
