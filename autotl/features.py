"""One forward pass per image set, cached: pooled features, source-head logits, prefix activations.

Everything a trial does not change is computed once. A single pass through the frozen source
backbone yields, for each image, the activation at every requested *cut* (the input of stage
``cut``), the pooled pre-logit features (cut ``N``) and the source-head logits. The scoring
metrics, the influence step, the linear probe and every trial with a frozen prefix read them
from here. Arrays are cached on disk, keyed by the model and its weights, the eval transform and
the exact files (path, size, mtime), so a resumed or repeated run costs no forward pass.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import _console
from ._images import load_rgb
from ._io import atomic_path
from .data import Sample
from .models import SourceModel
from .stages import staged_backbone

# fp16 keeps prefix maps small on disk and in memory; pooled features and logits stay fp32.
_MAP_DTYPE = np.float16


class ImageDataset(Dataset):
    """(tensor, label, index) for a list of samples and a torchvision/timm transform."""

    def __init__(self, samples: Sequence[Sample], transform):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_rgb(s.path)), s.label, i


def eval_transform(data_config: dict):
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def train_transform(data_config: dict, *, rand_augment: int = 0):
    """timm's standard training augmentation (random resized crop, flip, colour jitter); with
    ``rand_augment`` > 0 also timm's RandAugment at that magnitude (2 ops, magnitude std 0.5)."""
    from timm.data import create_transform

    extra = {"auto_augment": f"rand-m{int(rand_augment)}-n2-mstd0.5"} if rand_augment > 0 else {}
    return create_transform(**data_config, is_training=True, **extra)


def loader_workers(device: torch.device) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return min(8, cores)
    return 1 if cores > 1 else 0  # one decoder beside the compute threads on small CPUs


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, device: torch.device, seed: int = 0) -> DataLoader:
    workers = loader_workers(device)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )


def files_fingerprint(samples: Sequence[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        st = os.stat(s.path)
        h.update(f"{os.fspath(s.path)}\0{st.st_size}\0{st.st_mtime_ns}\0{s.label}\n".encode())
    return h.hexdigest()[:20]


@dataclass
class ActivationSet:
    """Cached outputs of the frozen source network for one list of samples."""

    labels: torch.Tensor  # (N,) int64
    pooled: torch.Tensor  # (N, D) float32: pre-logit features (cut N)
    source_logits: torch.Tensor | None  # (N, C_s) float32, None when the model has no source head
    maps: dict[int, torch.Tensor]  # cut -> (N, C, H, W) float16 activations

    def at(self, cut: int, num_stages: int) -> torch.Tensor:
        return self.pooled if cut >= num_stages else self.maps[cut]


class FeatureExtractor:
    """Runs the frozen source backbone once per (model, transform, files) and caches the result."""

    def __init__(self, source: SourceModel, *, device: torch.device | str = "cpu", cache_dir: str | Path | None = None,
                 batch_size: int = 64, max_cache_bytes: int = 3 << 30):
        self.source = source
        self.device = torch.device(device)
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.max_cache_bytes = max_cache_bytes
        self.stages, self.pool = staged_backbone(source.model)
        self.num_stages = len(self.stages)
        self.transform = eval_transform(source.data_config)
        self.forward_batches = 0  # batches pushed through the backbone (tests count these)
        self._memory: dict[str, dict[str, np.ndarray]] = {}

    # cache keys ---------------------------------------------------------------------------
    def _key(self, samples: Sequence[Sample]) -> str:
        ident = {
            "model": self.source.label,
            "weights": self.source.weights_id,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.source.data_config.items()},
            "files": files_fingerprint(samples),
            "format": 1,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def _path(self, key: str, what: str) -> Path | None:
        return self.cache_dir / key / f"{what}.npy" if self.cache_dir else None

    def _load(self, key: str, what: str) -> np.ndarray | None:
        mem = self._memory.get(key, {})
        if what in mem:
            return mem[what]
        path = self._path(key, what)
        if path is not None and path.is_file():
            arr = np.load(path, mmap_mode="r")
            self._memory.setdefault(key, {})[what] = arr
            return arr
        return None

    def _store(self, key: str, what: str, arr: np.ndarray) -> None:
        self._memory.setdefault(key, {})[what] = arr
        path = self._path(key, what)
        if path is not None:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, arr)

    def map_bytes(self, n_images: int, cut: int) -> int:
        """Bytes to cache the activation at ``cut`` for ``n_images`` (to decide if caching pays)."""
        if cut >= self.num_stages:
            return 0
        # (C, H, W) maps of a conv net, (tokens, dim) of a ViT: any shape
        return n_images * math.prod(self.map_shape(cut)) * np.dtype(_MAP_DTYPE).itemsize

    def map_shape(self, cut: int) -> tuple[int, ...]:
        size = self.source.data_config["input_size"]
        x = torch.zeros(1, *size)
        with torch.no_grad():
            for _, stage in self.stages[:cut]:
                x = stage.eval()(x)
        return tuple(x.shape[1:])

    # the pass -------------------------------------------------------------------------------
    def extract(self, samples: Sequence[Sample], cuts: Sequence[int] = (), *, description: str = "features") -> ActivationSet:
        """Pooled features + source logits (+ activations at ``cuts``) for ``samples``, from cache
        where possible, else by one forward pass that computes everything missing at once."""
        cuts = sorted({int(c) for c in cuts if 0 <= int(c) < self.num_stages})
        key = self._key(samples)
        wanted = ["labels", "pooled", "logits", *[f"cut{c}" for c in cuts]]
        missing = [w for w in wanted if self._load(key, w) is None]
        if missing:
            self._compute(samples, key, [int(w[3:]) for w in missing if w.startswith("cut")], description)
        labels = torch.from_numpy(np.array(self._load(key, "labels"), dtype=np.int64))
        logits = self._load(key, "logits")
        return ActivationSet(
            labels=labels,
            pooled=torch.from_numpy(np.array(self._load(key, "pooled"), dtype=np.float32)),
            source_logits=torch.from_numpy(np.array(logits, dtype=np.float32)) if logits is not None and logits.size else None,
            maps={c: torch.from_numpy(np.array(self._load(key, f"cut{c}"))) for c in cuts},
        )

    @torch.no_grad()
    def _compute(self, samples: Sequence[Sample], key: str, cuts: list[int], description: str) -> None:
        n = len(samples)
        for c in cuts:
            need = self.map_bytes(n, c)
            if need > self.max_cache_bytes:
                raise MemoryError(f"caching cut {c} needs {need / 2**30:.1f} GiB > {self.max_cache_bytes / 2**30:.1f} GiB")
        classifier = self.source.model.get_classifier() if self.source.num_source_classes else None
        modules = nn.ModuleList([*(m for _, m in self.stages), self.pool]).to(self.device).eval()
        if classifier is not None:
            classifier = classifier.to(self.device).eval()
        use_cuda = self.device.type == "cuda"
        if use_cuda:
            modules = modules.to(memory_format=torch.channels_last)
        out: dict[str, np.ndarray] = {}
        loader = make_loader(ImageDataset(samples, self.transform), batch_size=self.batch_size, shuffle=False, device=self.device)
        with _console.progress(f"{description} ({self.source.label})", total=n) as bar:
            for images, labels, idx in loader:
                images = images.to(self.device, non_blocking=True)
                if use_cuda:
                    images = images.to(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_cuda):
                    x = images
                    for i, stage in enumerate(modules[: self.num_stages]):
                        if i in cuts:
                            self._put(out, f"cut{i}", idx, x, n, _MAP_DTYPE)
                        x = stage(x)
                    pooled = modules[self.num_stages](x)
                    self._put(out, "pooled", idx, pooled, n, np.float32)
                    if classifier is not None:
                        self._put(out, "logits", idx, classifier(pooled), n, np.float32)
                self._put(out, "labels", idx, labels, n, np.int64)
                self.forward_batches += 1
                bar.advance(len(idx))
        if classifier is None:
            out["logits"] = np.zeros((n, 0), np.float32)
        for what, arr in out.items():
            self._store(key, what, arr)
        self.source.model.cpu()

    @staticmethod
    def _put(out: dict, what: str, idx: torch.Tensor, value: torch.Tensor, n: int, dtype) -> None:
        value = value.detach().float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()
        if what not in out:
            out[what] = np.empty((n, *value.shape[1:]), dtype=dtype)
        out[what][idx.numpy()] = value
