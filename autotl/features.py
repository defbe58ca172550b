"""One forward pass per image set, cached: pooled features, source-head logits, prefix activations.

Everything a trial does not change is computed once. A single pass through the frozen source
backbone yields, for each image, the activation at every requested *cut* (the input of stage
``cut``), the pooled pre-logit features (cut ``N``) and the source-head logits. The scoring
metrics, the influence step, the linear probe and every trial with a frozen prefix read them
from here. Arrays are cached on disk, keyed by the model and its weights, the eval transform and
the exact files (path, size, mtime), so a resumed or repeated run costs no forward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import _console
from .backend import FrozenForward, frozen_forward, pick_backend
from .device import DevicePolicy, activation_bytes_per_image, as_policy
from ._images import DRAFT_MARGIN, draft_side, load_rgb
from ._io import atomic_path
from ._memory import trim_heap
from .data import Sample
from .models import SourceModel
from .stages import staged_backbone

# fp16 keeps prefix maps small on disk and in memory; pooled features and logits stay fp32.
_MAP_DTYPE = np.float16
# What an image goes through the frozen network as: preprocessed, or also mirrored left-right (an
# augmented view for training a probe, and the flip of test-time augmentation).
VIEWS = ("center", "flip")


class ImageDataset(Dataset):
    """(tensor, label, index) for a list of samples and a torchvision/timm transform.

    A JPEG much larger than the transform's resize needs is decoded at a reduced scale (libjpeg's
    1/2, 1/4, 1/8; see :func:`decode_min_side`); ``draft=False`` always decodes at full size."""

    def __init__(self, samples: Sequence[Sample], transform, *, draft: bool = True):
        self.samples = list(samples)
        self.transform = transform
        self.min_side = decode_min_side(transform) if draft else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        return self.transform(load_rgb(s.path, min_side=self.min_side)), s.label, i


class DecodedImages:
    """The images of a run decoded once: a frozen pass writes each image's pixels after the eval
    transform's resize and crop (uint8, before ``ToTensor`` and ``Normalize``, so nothing is lost)
    into a file per list of images, and every later pass over the same images and geometry (the next
    candidate backbone, the flipped view) reads pixels instead of decoding the files again. The
    run's candidates share one preprocessing (``models.shared_input_config``), so one decode serves
    them all. Files are written and read by plain I/O (page cache, not resident memory) in a
    temporary folder removed when the store is closed or collected."""

    def __init__(self, directory: str | Path | None = None, *, max_bytes: int = 2 << 30):
        import tempfile
        import weakref

        root = Path(directory) if directory else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self._tmp = tempfile.TemporaryDirectory(prefix="autotl-pixels-", dir=root)
        self.folder = Path(self._tmp.name)
        self._close = weakref.finalize(self, self._tmp.cleanup)
        self.max_bytes = int(max_bytes)
        self.decoded = 0  # images decoded into the store (tests count these)

    def close(self) -> None:
        self._close()

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` of pixels may go to the store: at most ``max_bytes``, leaving the disk
        at least as much free again."""
        import shutil

        try:
            free = shutil.disk_usage(self.folder).free
        except OSError:
            return False
        return nbytes <= self.max_bytes and 2 * nbytes <= free

    def path(self, fingerprint: str, to_pixels) -> Path:
        ident = json.dumps({"files": fingerprint, "pixels": repr(to_pixels)}, sort_keys=True)
        return self.folder / (hashlib.sha256(ident.encode()).hexdigest()[:24] + ".u8")


def split_eval_transform(transform):
    """``(pixels, (h, w), mean, std)`` for an eval transform that ends in a centre crop, ``ToTensor`` and
    ``Normalize`` (timm's and torchvision's): ``pixels`` is the transform up to the crop, then the
    crop as a uint8 ``(3, h, w)`` tensor; ``mean`` and ``std`` turn those pixels into the network's
    input exactly as the whole transform does. None for any other transform (the pixels' size must
    be known before any image is decoded)."""
    from timm.data.transforms import MaybeToTensor
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", None) or [])
    if (len(steps) < 3 or not isinstance(steps[-3], T.CenterCrop) or not isinstance(steps[-2], (MaybeToTensor, T.ToTensor))
            or not isinstance(steps[-1], T.Normalize)):
        return None
    size = steps[-3].size
    h, w = (int(size[0]), int(size[-1])) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return T.Compose([*steps[:-2], T.PILToTensor()]), (h, w), steps[-1].mean, steps[-1].std


class _InputBatch:
    """One pass's input batch, allocated once and refilled from uint8 ``(m, 3, H, W)`` pixels with
    ``ToTensor`` + ``Normalize``'s arithmetic (the same float32 operations, so the same numbers).
    Reused because a fresh float batch per step, allocated in this process, leaves glibc's heap
    holding hundreds of MB after a pass over a few hundred images (batches from decoder processes
    arrive in shared memory instead). A consumer reads each batch before asking for the next."""

    def __init__(self, batch_size: int, h: int, w: int, mean, std):
        self.pixels = torch.empty((batch_size, 3, h, w), dtype=torch.uint8)
        self.x = torch.empty((batch_size, 3, h, w), dtype=torch.float32)
        self.mean = torch.as_tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.as_tensor(std, dtype=torch.float32)[:, None, None]

    def fill(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.x[:pixels.shape[0]]
        x.copy_(pixels)
        return x.div_(255).sub_(self.mean).div_(self.std)


def decode_min_side(transform) -> int | None:
    """The shorter side an image must keep for ``transform`` (a timm/torchvision ``Compose``) to see
    what it would see at full size, with ``DRAFT_MARGIN``: from its first step, the resize of the eval
    transform (target: the resized shorter side, or the larger target side) or the random resized crop
    of the training one (its smallest crop, the least scale at the most extreme aspect ratio, still
    covers the output size). None (always decode at full size) for a transform that starts otherwise."""
    from timm.data.transforms import RandomResizedCropAndInterpolation, ResizeKeepRatio
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None) or [transform]
    first = steps[0]
    if isinstance(first, (RandomResizedCropAndInterpolation, T.RandomResizedCrop)):
        size = first.size if isinstance(first.size, (tuple, list)) else (first.size, first.size)
        lo, hi = first.ratio
        least = min(first.scale) * min(lo, 1.0 / hi, 1.0)  # smallest crop side² / shorter image side²
        return draft_side(max(size) / math.sqrt(least)) if least > 0 else None
    if isinstance(first, ResizeKeepRatio):
        if first.random_scale_prob > 0 or first.random_aspect_prob > 0:
            return None
        return draft_side(max(first.size))
    if isinstance(first, T.Resize):
        size = first.size
        return draft_side(max(size) if isinstance(size, (tuple, list)) else size)
    return None


def eval_transform(data_config: dict):
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def train_transform(data_config: dict, *, rand_augment: int = 0):
    """timm's standard training augmentation (random resized crop, flip, colour jitter); with
    ``rand_augment`` > 0 also timm's RandAugment at that magnitude (2 ops, magnitude std 0.5)."""
    from timm.data import create_transform

    extra = {"auto_augment": f"rand-m{int(rand_augment)}-n2-mstd0.5"} if rand_augment > 0 else {}
    return create_transform(**data_config, is_training=True, **extra)


def decode_workers(device: torch.device | DevicePolicy) -> int:
    """Decoder processes for a frozen pass (``DevicePolicy.decode_workers``)."""
    return as_policy(device).decode_workers


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, device: torch.device | DevicePolicy, seed: int = 0,
                workers: int | None = None, persistent: bool = False) -> DataLoader:
    """A loader with the device policy's settings (workers, pinned memory, prefetch); ``workers``
    overrides the count, ``persistent`` keeps the workers across epochs where the policy does (only
    for a data set that does not change between epochs: workers hold a copy)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(seed) if shuffle else None,
                      **as_policy(device).loader_kwargs(workers, persistent=persistent))


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
    # cut -> (N, C) float32: the activation at that cut pooled (intermediate-stage features, Head2Toe-style)
    taps: dict[int, torch.Tensor] = field(default_factory=dict)

    def at(self, cut: int, num_stages: int) -> torch.Tensor:
        return self.pooled if cut >= num_stages else self.maps[cut]


# images a frozen pass decodes per batch (the policy may size larger ones from free accelerator
# memory): the backends run no faster on larger ones on CPU (onnxruntime takes 8 at a time), while
# every batch in flight (the decoders prefetch two) is resident in the main process: 52 MB at 64
# images of 260 px
FROZEN_BATCH = 32


class FeatureExtractor:
    """Runs the frozen source backbone once per (model, transform, files, backend) and caches the result.

    The pass goes through ``autotl.backend`` (onnxruntime on CPU, bf16 on CUDA, eager otherwise);
    with a ``cache_dir`` every array is written row by row into a ``.npy`` there and
    read back memory-mapped, so a cache of any size costs page cache, not resident memory.
    """

    def __init__(self, source: SourceModel, *, device: torch.device | str | DevicePolicy = "cpu",
                 cache_dir: str | Path | None = None, batch_size: int = FROZEN_BATCH, max_cache_bytes: int = 3 << 30,
                 backend: str | None = None, decoded: DecodedImages | None = None):
        self.source = source
        self.decoded = decoded  # shared by the run's extractors: images decoded once for every backbone and view
        self.policy = as_policy(device)  # the run's: training with this extractor on its device uses it too
        self.device = self.policy.device
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size = batch_size
        self.max_cache_bytes = max_cache_bytes
        self.backend = pick_backend(self.policy, backend)
        self.stages, self.pool = staged_backbone(source.model)
        self.num_stages = len(self.stages)
        self.transform = eval_transform(source.data_config)
        self.forward_batches = 0  # batches pushed through the backbone (tests count these)
        self._memory: dict[str, dict[str, np.ndarray]] = {}
        self._widths: dict[int, int] = {}
        self._fingerprints: dict[tuple, str] = {}

    @property
    def tap_cuts(self) -> list[int]:
        """The cuts whose pooled activation every pass also gives: each stage's output but the last
        (whose pooled output is ``pooled``)."""
        return list(range(1, self.num_stages))

    # cache keys ---------------------------------------------------------------------------
    def _files_fingerprint(self, samples: Sequence[Sample]) -> str:
        """``files_fingerprint``, once per list of files in this process: a trial asks for the same
        folds' features many times, and each answer would stat every file again."""
        ident = tuple((s.path, s.label) for s in samples)
        if ident not in self._fingerprints:
            self._fingerprints[ident] = files_fingerprint(samples)
        return self._fingerprints[ident]

    def _key(self, samples: Sequence[Sample], view: str = "center") -> str:
        ident = {
            "model": self.source.label,
            "weights": self.source.input_id,
            "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in self.source.data_config.items()},
            "files": self._files_fingerprint(samples),
            # bf16 on CUDA gives other numbers than fp32 on CPU: a backend change never serves stale features
            "backend": self.backend,
            "view": view,
            "decode": f"draft x{DRAFT_MARGIN:g}",  # large JPEGs decode at reduced scale (ImageDataset)
            "format": 3,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def cached(self, samples: Sequence[Sample], view: str = "center") -> bool:
        """Whether ``samples`` seen as ``view`` are computed already (in memory or on disk): no pass owed."""
        return self._load(self._key(list(samples), view), "pooled") is not None

    def _path(self, key: str, what: str) -> Path | None:
        return self.cache_dir / key / f"{what}.npy" if self.cache_dir else None

    def _load(self, key: str, what: str) -> np.ndarray | None:
        mem = self._memory.get(key, {})
        if what in mem:
            return mem[what]
        path = self._path(key, what)
        if path is not None and path.is_file():
            # copy-on-write mapping: writable for torch.from_numpy, pages shared with the page cache
            arr = np.load(path, mmap_mode="c")
            self._memory.setdefault(key, {})[what] = arr
            return arr
        return None

    def release(self) -> None:
        """Unmap the arrays this extractor maps from its disk cache (mapped pages count as resident
        memory); a later ``extract`` maps them again, with no forward. Arrays without a file behind them
        (no cache folder) are the only copy and stay."""
        for key in list(self._memory):
            held = {what: a for what, a in self._memory[key].items() if not isinstance(a, np.memmap)}
            if held:
                self._memory[key] = held
            else:
                del self._memory[key]

    def map_bytes(self, n_images: int, cut: int) -> int:
        """Bytes to cache the activation at ``cut`` for ``n_images`` (to decide if caching pays)."""
        if cut >= self.num_stages:
            return 0
        # (C, H, W) maps of a conv net, (tokens, dim) of a ViT: any shape
        return n_images * math.prod(self.map_shape(cut)) * np.dtype(_MAP_DTYPE).itemsize

    def feature_width(self, cut: int | None) -> int:
        """Width of the pooled features (``cut`` None) or of the pooled activation at ``cut`` (a tap)."""
        if cut is None:
            model = self.source.model
            width = getattr(model, "head_hidden_size", None) or getattr(model, "num_features", None)
            if width:
                return int(width)
            cut = self.num_stages
        if cut not in self._widths:
            size = self.source.data_config["input_size"]
            with torch.no_grad():
                a = torch.zeros(1, *size)
                for _, stage in self.stages[:cut]:
                    a = stage.eval()(a)
                if cut >= self.num_stages:
                    a = self.pool.eval()(a)
            from .backend import global_pool

            self._widths[cut] = int(global_pool(a).shape[1])
        return self._widths[cut]

    def map_shape(self, cut: int) -> tuple[int, ...]:
        size = self.source.data_config["input_size"]
        x = torch.zeros(1, *size)
        with torch.no_grad():
            for _, stage in self.stages[:cut]:
                x = stage.eval()(x)
        return tuple(x.shape[1:])

    # the pass -------------------------------------------------------------------------------
    def extract(self, samples: Sequence[Sample], cuts: Sequence[int] = (), *, view: str = "center",
                description: str = "features") -> ActivationSet:
        """Pooled features, intermediate-stage taps and source logits (+ activations at ``cuts``) for
        ``samples`` seen as ``view``, from cache where possible, else by one forward pass that
        computes everything missing at once."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        cuts = sorted({int(c) for c in cuts if 0 <= int(c) < self.num_stages})
        taps = [f"tap{c}" for c in self.tap_cuts]
        wanted = ["labels", "pooled", "logits", *taps, *[f"cut{c}" for c in cuts]]
        key = self._key(samples, view)
        missing = [w for w in wanted if self._load(key, w) is None]
        if missing:
            runner = self._runner([int(w[3:]) for w in missing if w.startswith("cut")])
            if runner.name != self.backend:  # the fallback's numbers get the fallback's key
                self.backend = runner.name
                key = self._key(samples, view)
                missing = [w for w in wanted if self._load(key, w) is None]
            if missing:
                self._compute(samples, key, runner, description, view)
            runner.close()
            trim_heap()  # the pass's arena and batches: not resident under what comes next
        labels = torch.from_numpy(np.array(self._load(key, "labels"), dtype=np.int64))
        logits = self._load(key, "logits")
        return ActivationSet(
            labels=labels,
            pooled=torch.from_numpy(np.array(self._load(key, "pooled"), dtype=np.float32)),
            source_logits=torch.from_numpy(np.array(logits, dtype=np.float32)) if logits is not None and logits.size else None,
            maps={c: torch.from_numpy(self._load(key, f"cut{c}")) for c in cuts},  # memory-mapped when cached on disk
            taps={c: torch.from_numpy(np.array(self._load(key, f"tap{c}"), dtype=np.float32)) for c in self.tap_cuts},
        )

    def _runner(self, cuts: list[int]) -> FrozenForward:
        classifier = self.source.model.get_classifier() if self.source.num_source_classes else None
        return frozen_forward([m for _, m in self.stages], self.pool, classifier, cuts, backend=self.backend,
                              device=self.policy, input_size=self.source.data_config["input_size"],
                              label=self.source.label, weights_id=self.source.input_id,
                              graph_dir=self.cache_dir / "graphs" if self.cache_dir else None, taps=self.tap_cuts)

    def _pass_batch(self, runner: FrozenForward, n_images: int) -> int:
        """``batch_size``, or larger where the policy sizes frozen-pass batches from free memory."""
        if self.policy.memory_bytes is None:
            return self.batch_size
        size = self.source.data_config["input_size"]
        per_image = activation_bytes_per_image(runner.graph, size, self.policy.value_bytes)
        return self.policy.frozen_batch(self.batch_size, per_image, n_images)

    def _compute(self, samples: Sequence[Sample], key: str, runner: FrozenForward, description: str,
                 view: str = "center") -> None:
        n = len(samples)
        cuts = list(runner.graph.cuts)
        for c in cuts:
            need = self.map_bytes(n, c)
            if need > self.max_cache_bytes:
                raise MemoryError(f"caching cut {c} needs {need / 2**30:.1f} GiB > {self.max_cache_bytes / 2**30:.1f} GiB")
        dtypes = {**{f"cut{c}": _MAP_DTYPE for c in cuts}, **{f"tap{c}": np.float32 for c in runner.graph.taps},
                  "pooled": np.float32, "logits": np.float32, "labels": np.int64}
        loader = self._batches(samples, self._pass_batch(runner, n))
        with contextlib.ExitStack() as files, _console.progress(
                f"{description} ({self.source.label}{', flipped' if view == 'flip' else ''})", total=n) as bar:
            out = _Outputs(n, dtypes, {w: self._path(key, w) for w in dtypes}, files)
            for images, labels, idx in loader:
                rows = idx.numpy()
                if view == "flip":
                    images = images.flip(-1)
                for what, value in runner(images).items():
                    out.put(what, rows, value)
                out.put("labels", rows, labels.numpy())
                self.forward_batches += 1
                bar.advance(len(idx))
            if "logits" not in runner.names:
                out.put("logits", np.arange(0), np.zeros((0, 0), np.float32))
            arrays = out.finish()
        for what, arr in arrays.items():
            self._memory.setdefault(key, {}).pop(what, None)
            if self._path(key, what) is None:
                self._memory[key][what] = arr
            else:
                self._load(key, what)  # the written file, memory-mapped

    def _batches(self, samples: Sequence[Sample], batch_size: int):
        """The pass's ``(images, labels, indices)`` batches: read from the run's decoded pixels when an
        earlier pass over these images left them (``DecodedImages``), else decoded from the files (and
        left there for the next pass)."""
        split = split_eval_transform(self.transform) if self.decoded is not None else None
        _, h, w = (int(v) for v in self.source.data_config["input_size"])
        n, row_bytes = len(samples), h * w * 3
        if split is None or split[1] != (h, w) or not self.decoded.fits(n * row_bytes):
            yield from make_loader(ImageDataset(samples, self.transform), batch_size=batch_size, shuffle=False,
                                   device=self.policy, workers=decode_workers(self.policy))
            return
        to_pixels, _, mean, std = split
        path = self.decoded.path(self._files_fingerprint(samples), to_pixels)
        batch = _InputBatch(batch_size, h, w, mean, std)
        if path.is_file() and path.stat().st_size == n * row_bytes:
            labels = torch.tensor([s.label for s in samples], dtype=torch.long)
            with open(path, "rb") as fh:
                for start in range(0, n, batch_size):
                    m = min(batch_size, n - start)
                    fh.readinto(batch.pixels[:m].numpy())
                    yield batch.fill(batch.pixels[:m]), labels[start:start + m], torch.arange(start, start + m)
            return
        loader = make_loader(ImageDataset(samples, to_pixels), batch_size=batch_size, shuffle=False, device=self.policy,
                             workers=decode_workers(self.policy))
        part = path.with_suffix(".part")
        try:
            with open(part, "wb") as fh:
                for pixels, labels, idx in loader:
                    fh.write(pixels.numpy().data)
                    self.decoded.decoded += len(idx)
                    yield batch.fill(pixels), labels, idx
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)


class _Outputs:
    """The arrays one pass fills, row by row: ``.npy`` files written atomically (under ``files``, an
    ExitStack of ``atomic_path`` contexts) when they have a path, else in memory.

    Rows go to the files by plain writes at their offsets, not through a writable memory map: the
    pages of a map being filled count as the process's resident memory until it is closed (a pass
    caching the input-sized prefix of 700 images writes 300 MB), while written pages sit in the
    page cache, which the kernel can reclaim."""

    def __init__(self, n: int, dtypes: dict[str, type], paths: dict[str, Path | None], files: contextlib.ExitStack):
        self.n, self.dtypes, self.paths, self.files = n, dtypes, paths, files
        self.arrays: dict[str, np.ndarray] = {}
        self.handles: dict[str, tuple[Any, int, int]] = {}  # what -> (open file, data offset, bytes per row)

    def put(self, what: str, rows: np.ndarray, value: np.ndarray) -> None:
        if what not in self.arrays and what not in self.handles:
            shape, path = (self.n, *value.shape[1:]), self.paths.get(what)
            if path is None or not math.prod(shape):  # (numpy cannot map an empty array)
                self.arrays[what] = np.empty(shape, dtype=self.dtypes[what])
                if path is not None:
                    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                        np.save(fh, self.arrays[what])
            else:
                tmp = self.files.enter_context(atomic_path(path))
                dtype = np.dtype(self.dtypes[what])
                with open(tmp, "wb") as fh:  # the header, then the file at its full size
                    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                              "fortran_order": False, "shape": shape})
                    offset = fh.tell()
                    fh.truncate(offset + math.prod(shape) * dtype.itemsize)
                fh = self.files.enter_context(open(tmp, "r+b"))
                self.handles[what] = (fh, offset, math.prod(shape[1:]) * dtype.itemsize)
        if not rows.size:
            return
        if what in self.arrays:
            self.arrays[what][rows] = value
            return
        fh, offset, row_bytes = self.handles[what]
        data = np.ascontiguousarray(value, dtype=self.dtypes[what])
        if np.array_equal(rows, np.arange(rows[0], rows[0] + rows.size)):  # a batch of consecutive rows: one write
            fh.seek(offset + int(rows[0]) * row_bytes)
            fh.write(data.tobytes())
        else:
            for row, item in zip(rows, data):
                fh.seek(offset + int(row) * row_bytes)
                fh.write(item.tobytes())

    def finish(self) -> dict[str, np.ndarray]:
        for fh, _, _ in self.handles.values():
            fh.close()  # before atomic_path renames the files
        self.handles.clear()
        return {w: a for w, a in self.arrays.items() if self.paths.get(w) is None}
