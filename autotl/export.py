"""ONNX export of a trained classifier and an onnxruntime parity check against PyTorch.

The exported graph takes ``input`` (float32, ``[batch, C, H, W]``, already preprocessed as in
``model.json``) and returns ``logits`` (``[batch, n_classes]``); the batch axis is dynamic.
All weights are embedded in the one ``.onnx`` file (no external-data side files), and the file is
written atomically: an interrupted or failing export leaves an earlier ``model.onnx`` untouched.

Exporter (``exporter="auto"``): the TorchScript exporter first, then the torch.export-based
("dynamo") one if it raises, the order ``autotl.backend`` uses for frozen graphs. The TorchScript
exporter is deprecated ("will be removed") but exports the conv families the zoo holds correctly
and several times faster (a Lite0 probe with a flip head: about 11 s against 35-40 s here, where
torch.export's decompositions dominate); once it is removed it raises and dynamo takes over. Both
are checked by ``onnx.checker`` before the file replaces anything, and ``verify_onnx`` is the real
guard.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from autotl._console import log
from autotl._io import atomic_path
from autotl._memory import trim_heap

__all__ = ["export_onnx", "verify_onnx", "ParityReport", "INPUT_NAME", "OUTPUT_NAME", "MAX_PARITY_IMAGES"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
MAX_PARITY_IMAGES = 64
# images per forward in the parity check: for 240 px EfficientNet-Lite1 an eager forward and an
# onnxruntime run each peak about 1.2 GB above their start at 64 images, 0.25 GB at 8, 0.09 GB at 2
PARITY_BATCH = 2

Exporter = Literal["auto", "dynamo", "torchscript"]


# --------------------------------------------------------------------------- export


def export_onnx(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    input_size: tuple[int, int, int],
    opset: int = 18,
    exporter: Exporter = "auto",
) -> Path:
    """Export ``model`` (eval mode, CPU, float32) to a single self-contained ONNX file at ``path``.

    ``input_size`` is ``(C, H, W)``; the batch axis is dynamic. ``exporter``: ``"dynamo"``
    (torch.export based), ``"torchscript"`` (legacy) or ``"auto"`` (TorchScript, falling back to
    dynamo if it raises). The caller's model is not modified (its train/eval mode is
    restored; a copy is exported when it is not already on CPU in float32).
    Returns ``Path(path)``.
    """
    path = Path(path)
    if int(opset) < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if exporter not in ("auto", "dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'auto', 'dynamo' or 'torchscript', got {exporter!r}")
    c, h, w = (int(v) for v in input_size)

    net, was_training = _cpu_float32(model)
    # Batch 2, not 1: a batch of 1 can be specialised into the graph as a constant.
    example = torch.rand((2, c, h, w), generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    try:
        net.eval()
        with atomic_path(path) as tmp:
            used = _export_into(net, example, tmp, int(opset), exporter)
            _check_single_file(tmp)
        log(f"exported ONNX ({used} exporter, opset {opset}) to {path}")
    finally:
        if net is model:
            model.train(was_training)
        # the exporter's graphs are cyclic garbage (tens of MB for a small CNN): gone before the parity check
        gc.collect()
        trim_heap()
    return path


def _cpu_float32(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    was_training = model.training
    tensors = list(model.parameters()) + list(model.buffers())
    ok = all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors)
    if ok:
        return model, was_training
    net = copy.deepcopy(model).to(device="cpu", dtype=torch.float32)
    return net, was_training


def _export_into(net: torch.nn.Module, example: torch.Tensor, tmp: Path, opset: int, exporter: Exporter) -> str:
    if exporter in ("auto", "torchscript"):
        try:
            _export_torchscript(net, example, tmp, opset)
            return "torchscript"
        except Exception as exc:
            if exporter == "torchscript":
                raise
            first = exc
        log(f"[yellow]TorchScript ONNX export failed ({_first_line(first)}); retrying with the dynamo exporter")
        try:
            _export_dynamo(net, example, tmp, opset)
        except Exception as exc:
            raise RuntimeError(
                f"ONNX export failed with both exporters: torchscript: {_first_line(first)}; dynamo: {_first_line(exc)}"
            ) from exc
        return "dynamo"
    _export_dynamo(net, example, tmp, opset)
    return "dynamo"


def _export_dynamo(net: torch.nn.Module, example: torch.Tensor, tmp: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        torch.onnx.export(
            net,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,  # weights inside the .onnx file
            verbose=False,  # the exporter prints to stdout otherwise; stdout is for --json
        )


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, tmp: Path, opset: int) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (example,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
            verbose=False,
        )


def _check_single_file(path: Path) -> None:
    """onnx.checker on the written file; weights must be embedded, not in external data files."""
    import onnx

    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise RuntimeError(f"ONNX export of {path.name} stored weights in an external data file")
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    if INPUT_NAME not in names_in or names_out != [OUTPUT_NAME]:
        raise RuntimeError(f"exported ONNX graph has inputs {names_in} / outputs {names_out}, "
                           f"expected [{INPUT_NAME!r}] / [{OUTPUT_NAME!r}]")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else ""
    return f"{type(exc).__name__}: {msg[:200]}"


# --------------------------------------------------------------------------- parity


@dataclass
class ParityReport:
    """onnxruntime vs PyTorch logits on the same preprocessed images."""

    n_images: int
    max_abs_diff: float
    argmax_agree: bool
    argmax_mismatches: int
    passed: bool
    atol: float

    def to_json(self) -> dict:
        d = asdict(self)
        # NaN / inf are not JSON; a non-finite difference is reported as null (and failed).
        if not math.isfinite(d["max_abs_diff"]):
            d["max_abs_diff"] = None
        return d

    def summary(self) -> str:
        diff = f"{self.max_abs_diff:.2e}" if math.isfinite(self.max_abs_diff) else str(self.max_abs_diff)
        verdict = "passed" if self.passed else "FAILED"
        return (f"ONNX parity {verdict}: {self.n_images} images, max |diff| {diff} (atol {self.atol:g}), "
                f"{self.argmax_mismatches} argmax mismatches")

    def raise_if_failed(self) -> "ParityReport":
        if not self.passed:
            raise RuntimeError(
                self.summary() + "; the exported ONNX model does not reproduce the PyTorch model"
                " (stale or foreign .onnx file, or an exporter problem)"
            )
        return self


def verify_onnx(
    model: torch.nn.Module,
    onnx_path: str | os.PathLike,
    images: torch.Tensor | np.ndarray,
    *,
    atol: float = 1e-4,
) -> ParityReport:
    """Compare onnxruntime (CPUExecutionProvider) logits with PyTorch logits.

    ``images`` is a preprocessed float batch ``[N, C, H, W]`` (a single ``[C, H, W]`` image is
    accepted); the first ``MAX_PARITY_IMAGES`` (64) are used. Passes when every logit agrees
    within ``atol`` and the argmax agrees for every image. The caller reports a failed
    report (``raise_if_failed()`` turns it into a RuntimeError).
    """
    import onnxruntime as ort

    x = torch.as_tensor(images).detach().to(device="cpu", dtype=torch.float32)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, C, H, W] batch, got shape {tuple(x.shape)}")
    x = x[:MAX_PARITY_IMAGES].contiguous()

    net, was_training = _cpu_float32(model)
    chunks = torch.split(x, PARITY_BATCH)
    try:
        net.eval()
        with torch.no_grad():
            outs = [net(c) for c in chunks]
    finally:
        if net is model:
            model.train(was_training)
    ref = np.concatenate([(o[0] if isinstance(o, (tuple, list)) else o).detach().cpu().float().numpy() for o in outs])
    trim_heap()  # the eager activations' pages, before the session's arena comes

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    got = np.concatenate([session.run(None, {name: c.numpy()})[0] for c in chunks])

    if got.shape != ref.shape:
        return ParityReport(int(x.shape[0]), float("inf"), False, int(x.shape[0]), False, float(atol))
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    max_diff = float(diff.max()) if diff.size else 0.0
    if not np.all(np.isfinite(diff)):
        max_diff = float("nan")
    mismatches = int(np.count_nonzero(got.argmax(axis=1) != ref.argmax(axis=1)))
    passed = bool(math.isfinite(max_diff) and max_diff <= atol and mismatches == 0)
    return ParityReport(
        n_images=int(x.shape[0]),
        max_abs_diff=max_diff,
        argmax_agree=mismatches == 0,
        argmax_mismatches=mismatches,
        passed=passed,
        atol=float(atol),
    )
