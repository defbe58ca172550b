"""The source pool of selective joint fine-tuning: a class-per-folder image folder (``--source-pool DIR``).

``scan_pool(root)`` lists ``root/<class>/**/<image>`` (hidden files and folders, ``__MACOSX`` /
``@eaDir`` and non-image extensions ignored), decodes every image once to find the unreadable ones
(listed in ``SourcePool.skipped`` with a reason, never silently dropped) and caches that check on
disk keyed by the files (path, size, mtime), so a second scan of an unchanged pool only stats it.

Folder names that are ImageNet WordNet ids (``n02102040``) are mapped to their ImageNet-1k class
index (``SourcePool.imagenet_index``): the joint trainer can then start the source head from the
source model's own ImageNet classifier rows, and DATL weights w(y) of the source classes
(``autotl.score.load_datl_weights``) can weight the pool images (``pool_class_weights``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._console import log, progress
from .._images import UnreadableImageError, check_image
from .._io import atomic_write_json
from .._memory import BoundedMemory
from ..data import is_folder_entry, walk_images
from ..data import Sample
from ..errors import AutotlError

__all__ = ["SourcePool", "scan_pool", "imagenet_wnids", "pool_class_weights", "without_data_copies"]

_WNID = re.compile(r"^n\d{8}$")
_CHECK_FORMAT = "autotl.retrieval.pool-check/v1"


@dataclass
class SourcePool:
    """A scanned source pool: its classes (sorted folder names) and readable images."""

    root: Path
    classes: list[str]
    samples: list[Sample]  # Sample(path, pool class index), sorted by class then path
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    imagenet_index: list[int | None] = field(default_factory=list)  # per class: ImageNet-1k index or None
    fingerprint: str = ""  # sha256 over the files (path, size, mtime) and their labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def paths(self) -> list[str]:
        return [os.fspath(s.path) for s in self.samples]

    @property
    def labels(self) -> np.ndarray:
        return np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    @property
    def is_imagenet(self) -> bool:
        """Every class folder is an ImageNet-1k wnid."""
        return bool(self.classes) and all(i is not None for i in self.imagenet_index)

    def summary(self) -> dict[str, Any]:
        counts = np.bincount(self.labels, minlength=self.num_classes).tolist() if self.samples else [0] * self.num_classes
        return {
            "root": str(self.root),
            "n_images": len(self.samples),
            "n_classes": self.num_classes,
            "classes": dict(zip(self.classes, counts)),
            "imagenet_classes": sum(i is not None for i in self.imagenet_index),
            "n_skipped": len(self.skipped),
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped[:20]],
        }


@functools.lru_cache(maxsize=1)
def imagenet_wnids() -> list[str] | None:
    """The 1000 ImageNet-1k wnids in class-index order (timm's ``ImageNetInfo``), or None."""
    try:
        from timm.data import ImageNetInfo

        names = list(ImageNetInfo().label_names())
        return names if len(names) == 1000 else None
    except Exception:  # noqa: BLE001 - the mapping is a nicety, never fatal
        return None


def _check_one(path: Path) -> str | None:
    try:
        check_image(path)
    except UnreadableImageError as exc:
        return exc.reason
    return None


def scan_pool(root: str | os.PathLike, *, verify: bool = True, cache_dir: str | os.PathLike | None = None,
              workers: int | None = None) -> SourcePool:
    """Index the source pool folder ``root`` (one sub-folder of images per source class).

    With ``verify`` every image is decoded once (JPEGs at 1/8 scale) and unreadable ones are
    skipped and listed; with ``cache_dir`` the outcome is stored keyed by the files' paths, sizes
    and mtimes, so an unchanged pool is not decoded again.
    """
    root = Path(os.path.abspath(os.path.expanduser(os.fspath(root))))
    if not root.exists():
        raise AutotlError(f"--source-pool {root}: folder does not exist; give a folder with one sub-folder of images per source class")
    if not root.is_dir():
        raise AutotlError(f"--source-pool {root}: is not a folder; give a folder with one sub-folder of images per source class")
    try:
        with os.scandir(root) as it:
            dirs = sorted(e.name for e in it if is_folder_entry(e))
    except OSError as exc:
        raise AutotlError(f"--source-pool {root}: cannot list the folder ({exc.strerror or exc}); check its permissions") from exc
    found = {d: walk_images(root / d, []) for d in dirs}  # an unlistable sub-folder holds no images
    classes = [d for d in dirs if found[d]]
    files = [(p, ci) for ci, c in enumerate(classes) for p in found[c]]
    if not files:
        raise AutotlError(f"--source-pool {root}: no images in class sub-folders; put the pool's images in "
                          f"{root}/<class>/*.jpg (e.g. ImageNet wnid folders)")

    # fingerprint of what was listed (also the key of the verification cache)
    h = hashlib.sha256(_CHECK_FORMAT.encode())
    stats = []
    for p, ci in files:
        try:
            st = os.stat(p)
            stats.append((st.st_size, st.st_mtime_ns))
        except OSError:
            stats.append((-1, -1))
        h.update(f"{p}\0{stats[-1][0]}\0{stats[-1][1]}\0{classes[ci]}\n".encode("utf-8", "surrogateescape"))
    fingerprint = h.hexdigest()

    bad: dict[str, str] = {}
    cache_file = Path(cache_dir) / f"pool-{fingerprint[:32]}.json" if cache_dir is not None else None
    cached = False
    if verify and cache_file is not None and cache_file.is_file():
        try:
            blob = json.loads(cache_file.read_text())
            if blob.get("fingerprint") == fingerprint:
                bad = dict(blob["bad"])
                cached = True
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if verify and not cached:
        for (p, _), (size, _) in zip(files, stats):
            if size == 0:
                bad[str(p)] = "0-byte file"
            elif size < 0:
                bad[str(p)] = "cannot stat"
        todo = [p for p, _ in files if str(p) not in bad]
        n_workers = workers or max(1, min(4, os.cpu_count() or 1))
        with progress(f"checking {len(todo)} pool images", total=len(todo)) as task:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="autotl-pool") as ex:
                for p, reason in zip(todo, ex.map(_check_one, todo, chunksize=32)):
                    if reason is not None:
                        bad[str(p)] = reason
                    task.advance()
        if cache_file is not None:
            atomic_write_json(cache_file, {"format": _CHECK_FORMAT, "root": str(root), "fingerprint": fingerprint, "bad": bad})

    samples = [Sample(p, ci) for p, ci in files if str(p) not in bad]
    skipped = sorted(((Path(p), r) for p, r in bad.items()), key=lambda t: str(t[0]))
    wnids = imagenet_wnids()
    where = {w: i for i, w in enumerate(wnids)} if wnids else {}
    imagenet_index = [where.get(c) if _WNID.match(c) else None for c in classes]
    if skipped:
        log(f"[yellow]source pool: skipped {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''}[/] "
            + "; ".join(f"{p.name}: {r}" for p, r in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
    if not samples:
        raise AutotlError(f"--source-pool {root}: none of its {len(files)} images could be read; check the files")
    return SourcePool(root, classes, samples, skipped, imagenet_index, fingerprint)


def without_data_copies(pool: SourcePool, data: Sequence[Sample], memory: BoundedMemory | None = None
                        ) -> tuple[SourcePool, list[dict[str, str]]]:
    """``pool`` less its images that are byte-identical copies (sha256 of the bytes, whatever the
    path or name) of an image of the data set (``data``: its train, val and test samples): a pool
    image that is a validation image would train beside itself. Returns (the pool without them,
    ``[{"pool": path, "data": path}]``). Only files of a size some data image also has are hashed;
    the outcome is kept in ``memory`` (a run's: the trials of a search compare once)."""
    data_paths = sorted({os.fspath(s.path) for s in data})
    key = (pool.fingerprint, hashlib.sha256("\0".join(data_paths).encode("utf-8", "surrogateescape")).hexdigest())
    if memory is None:
        return _without_copies(pool, data_paths)
    return memory.part("pool-data-copies", 4).get(key, lambda: _without_copies(pool, data_paths))


def _without_copies(pool: SourcePool, data_paths: list[str]) -> tuple[SourcePool, list[dict[str, str]]]:
    from ..duplicates import content_digest

    def size(path: str) -> int:
        try:
            return os.stat(path).st_size
        except OSError:
            return -1

    data_sizes: dict[int, list[str]] = {}
    for path in data_paths:
        data_sizes.setdefault(size(path), []).append(path)
    candidates = [i for i, s in enumerate(pool.samples) if size(os.fspath(s.path)) in data_sizes]
    sizes = {size(os.fspath(pool.samples[i].path)) for i in candidates}
    digests: dict[bytes, str] = {}
    for n in sizes:
        for path in data_sizes[n]:
            digest = content_digest(path)
            if digest is not None:
                digests.setdefault(digest, path)
    overlap, dropped = [], set()
    for i in candidates:
        digest = content_digest(pool.samples[i].path)
        if digest is not None and digest in digests:
            dropped.add(i)
            overlap.append({"pool": os.fspath(pool.samples[i].path), "data": digests[digest]})
    out = pool
    if dropped:
        kept = [s for i, s in enumerate(pool.samples) if i not in dropped]
        if not kept:
            raise AutotlError(f"--source-pool {pool.root}: every one of its {len(pool)} images is a copy of an image of the "
                              "data set; give a pool of other images")
        fingerprint = hashlib.sha256((pool.fingerprint + "\0without\0" + "\0".join(o["pool"] for o in overlap)).encode(
            "utf-8", "surrogateescape")).hexdigest()
        used = sorted({s.label for s in kept})  # a class left without images is no class of the pool any more
        new_label = {old: new for new, old in enumerate(used)}
        out = dataclasses.replace(pool, classes=[pool.classes[c] for c in used],
                                  samples=[Sample(s.path, new_label[s.label]) for s in kept],
                                  imagenet_index=[pool.imagenet_index[c] for c in used] if pool.imagenet_index else [],
                                  fingerprint=fingerprint)
    return out, overlap


def pool_class_weights(pool: SourcePool, p_t: Sequence[float] | np.ndarray, class_names: Sequence[str] | None = None
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-pool-class DATL weights w = P_t / P_s from the target distribution ``p_t`` over the source
    model's classes, with P_s the pool's own class distribution (``autotl.transferability.pool_importance_weights``).

    A pool class is source class ``imagenet index`` when ``p_t`` covers ImageNet-1k (1000 entries)
    and the folder is a wnid, else the source class with the same name, else unmatched (weight 1).
    The mean weight over the pool *images* is 1 (the source loss keeps its scale).
    Returns (weights (n_classes,) float32, what was matched).
    """
    from ..transferability.datl import pool_importance_weights

    p_t = np.nan_to_num(np.asarray(p_t, dtype=np.float64).reshape(-1), nan=0.0, posinf=0.0, neginf=0.0)
    names = list(class_names or [])
    source_index: list[int | None] = []
    for ci, cname in enumerate(pool.classes):
        idx = pool.imagenet_index[ci] if ci < len(pool.imagenet_index) else None
        if idx is not None and len(p_t) == 1000:
            source_index.append(int(idx))
        elif cname in names and names.index(cname) < len(p_t):
            source_index.append(names.index(cname))
        else:
            source_index.append(None)
    matched = sum(i is not None for i in source_index)
    counts = np.bincount(pool.labels, minlength=pool.num_classes).astype(np.float64)
    w, _ = pool_importance_weights(p_t, source_index, counts)
    if matched and not sum(p_t[i] for i in source_index if i is not None) > 0:
        return np.ones(pool.num_classes, np.float32), {"matched_classes": matched, "used": "uniform (P_t is 0 on the pool's classes)"}
    return w.astype(np.float32), {"matched_classes": matched, "used": "datl",
                                  "p_s": f"pool class distribution ({int(counts.sum())} images, {pool.num_classes} classes)"}
