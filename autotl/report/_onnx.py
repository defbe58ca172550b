"""The ONNX section: the parity check against PyTorch, the file, its preprocessing, how to use it."""

from __future__ import annotations

from ._doc import Doc, omitted, section
from ._html import esc, kv_list, num, value_text


def onnx_section(doc: Doc) -> str:
    run = doc.run
    parity = run.parity
    onnx = run.dir / "model.onnx"
    if not parity and not onnx.is_file():
        return omitted("onnx", "ONNX export", "not in this run: no model.onnx / parity check")
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
    return section(doc, "onnx", "ONNX export", kv_list(items))
