"""Where frozen computation runs: onnxruntime on CPU, the device policy's eager path on CUDA, eager as fallback.

The frozen source backbone does most of a run's arithmetic (scoring every candidate, the prefix
caches, evaluation, data-dropout features) and never changes during a run, so it does not need
PyTorch's autograd-ready eager kernels. On CPU it runs as an onnxruntime session over a graph of
exactly the frozen computation — the requested cuts' activations, the pooled features and the
source logits in one pass — exported once per (model, weights, cuts, input size) into
``<cache>/graphs/`` beside the feature cache. Every session is first checked against PyTorch on
a seeded batch (max |Δ| ≤ ``PARITY_ATOL`` × max(1, max |eager|) on every output); one that fails, or an export that
raises, falls back to eager and says so once. On CUDA the eager modules run as the run's
``DevicePolicy`` says (channels_last under bf16 autocast: what the GPU is fast at); those numbers
differ from fp32, which is why the backend name (``DevicePolicy.eager_name``, e.g. ``cuda-bf16``)
is part of every feature-cache key (``FeatureExtractor._key``).
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from . import _console
from ._io import atomic_path
from .device import DevicePolicy, as_policy, cpu_cores

__all__ = ["FrozenForward", "EagerForward", "OrtForward", "pick_backend", "frozen_forward", "cpu_cores", "global_pool", "PARITY_ATOL",
           "BACKENDS"]

# Relative to each output's magnitude (absolute below 1): float32 rounding over a deep network
# grows with the values, so activations and logits of magnitude ~10 differ by a few 1e-4 between
# two correct kernels, while a wrong graph differs by orders more.
PARITY_ATOL = 1e-4
ORT_BATCH = 8  # onnxruntime's arena holds the largest batch's activations
BACKENDS = ("onnxruntime", "eager", "cuda-bf16", "cuda-fp32")  # the CPU ones and CUDA's (DevicePolicy.eager_name)
_GRAPH_FORMAT = 2  # bump when the exported graph's outputs change meaning


def pick_backend(device: torch.device | DevicePolicy, requested: str | None = None) -> str:
    """The policy's eager path (``cuda-bf16`` on a GPU) where it runs on a GPU or under autocast; on
    CPU ``onnxruntime`` when it is installed, else ``eager``. ``requested`` (or
    ``$AUTOTL_FROZEN_BACKEND``) forces ``eager`` or ``onnxruntime`` on CPU."""
    policy = as_policy(device)
    if policy.needs_eager:
        return policy.eager_name
    requested = requested or os.environ.get("AUTOTL_FROZEN_BACKEND") or None
    if requested not in (None, "onnxruntime", "eager"):
        from .errors import AutotlError

        raise AutotlError(f"AUTOTL_FROZEN_BACKEND={requested!r}: use onnxruntime or eager (or unset it)")
    if requested == "eager":
        return "eager"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "eager"
    return "onnxruntime"


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """An activation pooled to one vector per image: the spatial mean of a conv map ``(N, C, H, W)``,
    the token mean of a transformer's ``(N, T, D)``; flat activations as they are."""
    if x.ndim == 4:
        return x.mean(dim=(2, 3))
    if x.ndim == 3:
        return x.mean(dim=1)
    return x.flatten(1)


class _FrozenGraph(nn.Module):
    """stages → pool (→ source classifier), returning the input of every stage in ``cuts``, then the
    pooled activation at every cut in ``taps`` (intermediate-stage features), then the pooled
    features, then the logits (when there is a classifier)."""

    def __init__(self, stages: Sequence[nn.Module], pool: nn.Module, classifier: nn.Module | None, cuts: Sequence[int],
                 taps: Sequence[int] = ()):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = pool
        self.classifier = classifier
        self.cuts = tuple(cuts)
        self.taps = tuple(taps)

    def forward(self, x: torch.Tensor):
        maps, taps = [], []
        for i, stage in enumerate(self.stages):
            if i in self.cuts:
                maps.append(x)
            if i in self.taps:
                taps.append(global_pool(x))
            x = stage(x)
        pooled = self.pool(x)
        outs = [*maps, *taps, pooled]
        if self.classifier is not None:
            outs.append(self.classifier(pooled))
        return tuple(outs)

    def output_names(self) -> list[str]:
        return ([f"cut{c}" for c in self.cuts] + [f"tap{c}" for c in self.taps] + ["pooled"]
                + (["logits"] if self.classifier is not None else []))


class FrozenForward(abc.ABC):
    """Preprocessed images → {"cut<i>", "tap<i>", "pooled", "logits"?: float32 arrays} through the frozen network."""

    name: str

    def __init__(self, graph: _FrozenGraph):
        self.graph = graph
        self.names = graph.output_names()

    @abc.abstractmethod
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        """One batch through the frozen network."""

    def close(self) -> None:
        """Give back what a pass needed (the eager modules go back to CPU)."""


class EagerForward(FrozenForward):
    """PyTorch eager as the device policy says: fp32 on CPU; channels_last + bf16 autocast on CUDA."""

    def __init__(self, graph: _FrozenGraph, device: torch.device | DevicePolicy):
        super().__init__(graph)
        self.policy = as_policy(device)
        self.device = self.policy.device
        self.name = self.policy.eager_name
        self.graph = self.policy.module(graph).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        x = self.policy.format_input(images.to(self.device, non_blocking=True))
        with self.policy.autocast():
            outs = self.graph(x)
        return {n: o.detach().float().cpu().numpy() for n, o in zip(self.names, outs)}

    def close(self) -> None:
        self.policy.release(self.graph)


class OrtForward(FrozenForward):
    """An onnxruntime session over the exported frozen graph (CPU, as many threads as torch uses)."""

    name = "onnxruntime"

    def __init__(self, graph: _FrozenGraph, onnx_path: Path, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(graph)
        self.onnx_path = Path(onnx_path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = int(threads or torch.get_num_threads())  # the run's compute threads
        self.session = ort.InferenceSession(str(self.onnx_path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        # onnxruntime's arena keeps the largest batch's activations while the session lives (1.7 GB at
        # 64 images of 224 px, 0.5 GB at 16, about 0.2 GB at 8) and runs no faster on bigger batches:
        # feed it ORT_BATCH at a time
        parts = [self.session.run(self.names, {self.input_name: x[i:i + ORT_BATCH]}) for i in range(0, len(x), ORT_BATCH)]
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(self.names)}

    def close(self) -> None:
        self.session = None  # the session and its arena go now, not when the last reference does


def graph_key(label: str, weights_id: str, input_size: Sequence[int], cuts: Sequence[int], with_logits: bool,
              taps: Sequence[int] = ()) -> str:
    """Identity of one exported frozen graph (also the torch/onnx versions that wrote it)."""
    import onnx

    ident = {"model": label, "weights": weights_id, "input_size": [int(v) for v in input_size], "cuts": list(cuts),
             "taps": list(taps), "logits": bool(with_logits), "torch": torch.__version__, "onnx": onnx.__version__,
             "format": _GRAPH_FORMAT}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def export_frozen_graph(graph: _FrozenGraph, path: Path, input_size: Sequence[int]) -> Path:
    """The frozen graph as one ONNX file (dynamic batch), written atomically. The TorchScript
    exporter handles the conv families fast; the dynamo one is the fallback for anything else."""
    import onnx

    c, h, w = (int(v) for v in input_size)
    example = torch.rand((2, c, h, w), generator=torch.Generator().manual_seed(0))
    names = graph.output_names()
    graph = graph.cpu().eval()
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, (example,), str(tmp), input_names=["input"], output_names=names, opset_version=18,
                              dynamic_axes={n: {0: "batch"} for n in ["input", *names]}, dynamo=False, verbose=False)
        except Exception:  # noqa: BLE001 - an op the TorchScript exporter lacks: try torch.export's
            torch.onnx.export(graph, (example,), str(tmp), input_names=["input"], output_names=names, opset_version=18,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                              external_data=False, verbose=False)
        onnx.checker.check_model(str(tmp))
    return path


def parity(forward: FrozenForward, graph: _FrozenGraph, input_size: Sequence[int]) -> float:
    """Worst max |Δ| / max(1, max |eager|) between ``forward`` and PyTorch fp32 eager on a seeded batch
    of 2, over every output (compared with ``PARITY_ATOL``)."""
    x = torch.randn((2, *[int(v) for v in input_size]), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = [o.float().numpy() for o in graph.cpu().eval()(x)]
    got = forward(x)
    worst = 0.0
    for n, w in zip(forward.names, want):
        if w.size:
            diff = np.abs(got[n].astype(np.float64) - w) / max(1.0, float(np.max(np.abs(w))))
            m = float(np.max(diff))
            if not np.isfinite(m):
                return float("nan")  # fails the check
            worst = max(worst, m)
    return worst


def frozen_forward(stages: Sequence[nn.Module], pool: nn.Module, classifier: nn.Module | None, cuts: Sequence[int], *,
                   backend: str, device: torch.device | DevicePolicy, input_size: Sequence[int], label: str,
                   weights_id: str, graph_dir: Path | None, taps: Sequence[int] = ()) -> FrozenForward:
    """The runner for one pass. ``onnxruntime`` exports (or reuses) the graph in ``graph_dir`` (a
    temporary folder without a cache) and checks it against eager; on any failure, eager."""
    graph = _FrozenGraph(stages, pool, classifier, sorted(int(c) for c in cuts), sorted(int(t) for t in taps))
    if backend != "onnxruntime":
        return EagerForward(graph, device)
    import tempfile

    key = graph_key(label, weights_id, input_size, graph.cuts, classifier is not None, graph.taps)
    scratch = None
    if graph_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="autotl-graph-")
        graph_dir = Path(scratch.name)
    path = Path(graph_dir) / f"{key}.onnx"
    try:
        if not path.is_file():
            export_frozen_graph(graph, path, input_size)
        runner = OrtForward(graph, path)
        diff = parity(runner, graph, input_size)
        if not diff <= PARITY_ATOL:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"onnxruntime differs from PyTorch by {diff:.2e} of the output's scale > {PARITY_ATOL:g}")
        return runner
    except Exception as exc:  # noqa: BLE001 - any export/runtime problem: the eager fallback gives the same numbers
        msg = " ".join(str(exc).split())[:160]
        _console.log(f"[yellow]frozen {label}: onnxruntime backend unavailable ({type(exc).__name__}: {msg}); using PyTorch eager")
        return EagerForward(graph, device)
    finally:
        if scratch is not None:
            scratch.cleanup()  # the session has read the file
