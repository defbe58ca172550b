"""Every device decision in one place: the device, autocast, memory format, loader settings, batch sizes, threads.

A ``DevicePolicy`` is resolved once per run (``resolve_policy``; ``Run.policy``) and travels with the
run's feature extractors, so the frozen pass, training, evaluation and the search's cost model read
the same settings. Each setting is a plain field, so every branch but the device itself runs on a
CPU: ``resolve_policy("cpu", settings_for="cuda")`` gives CUDA's settings (bf16 autocast,
channels_last, decoder workers, prefetch, persistent training workers, batches sized from memory)
on the CPU, and the dataclass can be built field by field.

On CUDA: bf16 autocast where the GPU supports it (Ampere and later; no loss scaling needed, unlike
fp16), channels_last (what the tensor-core convolutions want), all but one core decoding images
(a GPU outruns any single decoder), pinned host memory and deeper prefetch, training workers kept
across epochs, frozen-pass batches sized from the free GPU memory, cuDNN autotuning and TF32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["DevicePolicy", "resolve_policy", "as_policy", "pick_device", "batch_size_for_memory",
           "activation_bytes_per_image", "configure_torch", "set_torch_threads", "cpu_cores", "MEMORY_SHARE",
           "MAX_AUTO_BATCH"]

MEMORY_SHARE = 0.5  # of the free accelerator memory a frozen-pass batch may take (the rest: allocator, other work)
MAX_AUTO_BATCH = 512  # beyond this a frozen pass gains nothing and the decoders fall behind
CUDA_PREFETCH = 4  # batches each decoder keeps ready for the GPU


def cpu_cores() -> int:
    """Cores this process may use (cgroup/affinity-aware where the OS tells)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_torch_threads() -> None:
    """Use every core we were given (cgroup-aware), not more."""
    torch.set_num_threads(max(1, cpu_cores()))


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``auto``/None: the first CUDA device when there is one, else the CPU; anything else as given."""
    if isinstance(device, torch.device):
        return device
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_size_for_memory(free_bytes: int, bytes_per_image: int, *, share: float = MEMORY_SHARE, low: int = 1,
                          high: int = MAX_AUTO_BATCH) -> int:
    """The largest power of two in ``[low, high]`` whose images take at most ``share`` of
    ``free_bytes`` at ``bytes_per_image`` each (``low`` when not even that fits)."""
    if bytes_per_image <= 0:
        return high
    fits = int(share * free_bytes // bytes_per_image)
    b = 1
    while b * 2 <= min(fits, high):
        b *= 2
    return max(low, min(b, high)) if fits >= 1 else low


@torch.no_grad()
def activation_bytes_per_image(module: nn.Module, input_size: tuple[int, ...] | list[int], value_bytes: int) -> int:
    """Bytes of every leaf module's output for one image at ``value_bytes`` per value: an upper bound
    of what a forward pass holds per image (no_grad frees most of it as it goes)."""
    total = 0

    def count(_m, _inp, out):
        nonlocal total
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                total += t.numel()

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        p = next(module.parameters(), None)
        was_training = module.training
        module.eval()
        module(torch.zeros(1, *[int(v) for v in input_size], device=p.device if p is not None else "cpu"))
        module.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return int(total * value_bytes)


_TAGS = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


@dataclass(frozen=True)
class DevicePolicy:
    """How one run uses its device. Build with ``resolve_policy``; tests set fields directly."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype of forward passes (training, evaluation, frozen pass)
    channels_last: bool = False  # nets and 4-D inputs in channels_last memory format
    loader_workers: int = 0  # processes decoding and augmenting training images
    decode_workers: int = 0  # processes decoding images for a frozen pass
    pin_memory: bool = False  # page-locked batches: asynchronous host-to-device copies
    prefetch_factor: int | None = None  # batches each worker keeps ready (None: torch's default)
    persistent_workers: bool = False  # training-image workers live across epochs (a static data set only)
    memory_bytes: int | None = None  # free accelerator memory at start: frozen-pass batches sized from it; None: not
    time_at_train_batch: bool = False  # the cost model times at the training batch (a GPU's rate depends on it)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def value_bytes(self) -> int:
        """Bytes per activation value under this policy's autocast."""
        return 2 if self.amp_dtype is not None else 4

    @property
    def eager_name(self) -> str:
        """The frozen-pass backend name of PyTorch eager under this policy. Part of the feature-cache
        key: bf16 (or TF32 on a GPU) gives other numbers than fp32 on a CPU."""
        if self.device.type == "cpu" and self.amp_dtype is None:
            return "eager"
        return f"{self.device.type}-{_TAGS.get(self.amp_dtype, str(self.amp_dtype))}"

    @property
    def needs_eager(self) -> bool:
        """The frozen pass must run eager (onnxruntime's CPU session is fp32 on the CPU only)."""
        return self.device.type != "cpu" or self.amp_dtype is not None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to ``amp_dtype`` on this device, or nothing."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def module(self, m: nn.Module) -> nn.Module:
        """``m`` on the device, in the policy's memory format (in place; returned for chaining)."""
        m.to(self.device)
        if self.channels_last:
            m.to(memory_format=torch.channels_last)
        return m

    def release(self, m: nn.Module) -> nn.Module:
        """``m`` back on the CPU in the contiguous format export and onnxruntime expect."""
        m.cpu()
        if self.channels_last:
            m.to(memory_format=torch.contiguous_format)
        return m

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch in the policy's memory format (4-D tensors only)."""
        if self.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def loader_kwargs(self, workers: int | None = None, *, persistent: bool = False) -> dict[str, Any]:
        """DataLoader settings: ``workers`` (default: the training loader's) processes, pinned memory,
        prefetch; ``persistent`` asks to keep the workers across epochs (when the policy does)."""
        workers = self.loader_workers if workers is None else int(workers)
        kwargs: dict[str, Any] = {"num_workers": workers, "pin_memory": self.pin_memory,
                                  "persistent_workers": bool(persistent and self.persistent_workers and workers > 0)}
        if workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def frozen_batch(self, requested: int, bytes_per_image: int | None, n_images: int | None = None) -> int:
        """The batch of a frozen pass over ``n_images``: ``requested``, or more where the free memory
        allows and the decoders stay busy (one worker decodes a whole batch: at least two batches each)."""
        if self.memory_bytes is None or not bytes_per_image:
            return requested
        b = batch_size_for_memory(self.memory_bytes, bytes_per_image)
        if n_images is not None and self.decode_workers > 0:
            b = min(b, batch_size_for_memory(n_images, 2 * self.decode_workers, share=1.0))
        return max(requested, b)

    def timing_batch(self, small: int, train_batch: int) -> int:
        """The batch the cost model times at: the training batch where the rate depends on it."""
        return max(small, int(train_batch)) if self.time_at_train_batch else small

    def synchronize(self) -> None:
        """Wait for the device's queued work (before reading a timer)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["device"], d["amp_dtype"] = str(self.device), _TAGS.get(self.amp_dtype, str(self.amp_dtype))
        return d


def _cuda_amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 unless a present GPU says it lacks it (pre-Ampere: fp32, as fp16 would need loss scaling)."""
    if device.type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def _free_memory(device: torch.device) -> int | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def resolve_policy(device: str | torch.device | None = "auto", *, settings_for: str | None = None,
                   cores: int | None = None, memory_bytes: int | None = None) -> DevicePolicy:
    """The policy for ``device`` (``auto``: CUDA when present). ``settings_for="cuda"`` gives CUDA's
    settings on whatever device (how CPU tests and ``bench/gpu.py --smoke`` run the GPU branches);
    ``cores`` and ``memory_bytes`` stand in for the machine's figures."""
    dev = pick_device(device)
    kind = settings_for or dev.type
    cores = cpu_cores() if cores is None else int(cores)
    if kind == "cuda":
        workers = max(1, min(16, cores - 1))  # the main process feeds the GPU; every other core decodes
        return DevicePolicy(
            dev, amp_dtype=_cuda_amp_dtype(dev), channels_last=True, loader_workers=workers, decode_workers=workers,
            pin_memory=dev.type == "cuda", prefetch_factor=CUDA_PREFETCH, persistent_workers=True,
            memory_bytes=memory_bytes if memory_bytes is not None else _free_memory(dev), time_at_train_batch=True)
    # CPU: one decoder beside the compute threads for training; for a frozen pass one per four cores
    # (decoding a 224 px photo costs about a fifth of its onnxruntime forward)
    return DevicePolicy(dev, loader_workers=1 if cores > 1 else 0,
                        decode_workers=max(1, cores // 4) if cores > 1 else 0, memory_bytes=memory_bytes)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def as_policy(device: "DevicePolicy | str | torch.device | None", fallback: DevicePolicy | None = None) -> DevicePolicy:
    """``device`` as a policy: a policy as given; a device (None: ``auto``) → ``fallback`` when that
    is on the same device (the run's policy, carried by its extractors), else the device's default."""
    if isinstance(device, DevicePolicy):
        return device
    dev = pick_device(device)
    if fallback is not None and _same_device(dev, fallback.device):
        return fallback
    return resolve_policy(dev)


def configure_torch(policy: DevicePolicy) -> None:
    """Process-wide switches for the policy's device. CUDA: cuDNN autotuning (a run's input shapes
    repeat) and TF32 matrix products for whatever runs outside autocast."""
    if policy.is_cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

