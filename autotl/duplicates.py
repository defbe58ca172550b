"""Duplicate images: byte-identical copies (content hash) and near-duplicates (perceptual hash).

A byte-identical image in ``train/`` and ``val/`` is a leak: the model has seen the answer and
val accuracy reads 1.0 on it. ``scan_dataset`` hashes every file once (sha256 of its bytes: about
50,000 small JPEGs per second from the page cache, a few percent of the decode that verifies
them; no cache needed) and records each copy as a ``Duplicate`` on the ``DatasetIndex``.

Near-duplicates (the same picture re-encoded, resized or re-saved) are found with a 64-bit
difference hash (dHash) of a 9x8 greyscale thumbnail of the image that verification decodes
anyway: pairs whose hashes differ in at most ``NEAR_DUPLICATE_BITS`` bits are candidates, and a
candidate is confirmed when 32x32 greyscale thumbnails of the two correlate at least
``NEAR_MIN_CORRELATION`` (only candidates are decoded again, at a reduced JPEG scale: few and
cheap). Reported, never removed: a perceptual hash can be fooled. Nearly flat images get no hash.

Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

__all__ = [
    "Duplicate", "DUPLICATE_MODES", "NEAR_DUPLICATE_BITS", "NEAR_MIN_CORRELATION",
    "content_digest", "dhash", "near_pairs", "thumbnail", "similar",
]

#: What ``scan_dataset(duplicates=...)`` does with byte-identical copies.
DUPLICATE_MODES = ("warn", "drop", "error")
#: Hamming distance (of 64 dHash bits) at or below which two images are near-duplicates. On the
#: 2,800 cats_vs_dogs images the one true re-encoded copy is at 0 and the next pairs at 8.
NEAR_DUPLICATE_BITS = 4
#: Pearson correlation of two 32x32 greyscale thumbnails at or above which a candidate pair is a
#: near-duplicate: a JPEG re-encoding at quality 50 and a 2x downscale stay above 0.985; similar but
#: different synthetic images (same colour and stripes, another phase) reach 0.96.
NEAR_MIN_CORRELATION = 0.975
_CONFIRM = (32, 32)
_THUMB = (9, 8)  # (width, height): 8 horizontal differences per row, 8 rows -> 64 bits
_MIN_RANGE = 8  # grey levels between the darkest and brightest thumbnail pixel below which: "flat", no hash
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Duplicate:
    """``path`` is a copy of ``original`` (byte-identical, or near: ``distance`` bits of 64 differ).

    ``split`` / ``label`` are where ``path`` was found, ``original_split`` / ``original_label``
    where the kept ``original`` is. ``action`` is ``"dropped"`` (removed from the index) or
    ``"kept"``."""

    kind: str  # "exact" | "near"
    path: Path
    original: Path
    split: str
    original_split: str
    label: str
    original_label: str
    action: str  # "dropped" | "kept"
    distance: int = 0

    @property
    def issue(self) -> str:
        """``"leak"`` (in two splits), ``"conflict"`` (same split, two classes) or ``"copy"``."""
        if self.split != self.original_split:
            return "leak"
        return "conflict" if self.label != self.original_label else "copy"

    def to_json(self) -> dict:
        return {
            "kind": self.kind, "issue": self.issue, "action": self.action,
            "path": str(self.path), "split": self.split, "class": self.label,
            "original": str(self.original), "original_split": self.original_split,
            "original_class": self.original_label, "distance": int(self.distance),
        }


def content_digest(path: str | os.PathLike) -> bytes | None:
    """sha256 of the file's bytes (``None`` when it cannot be read)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError:
        return None
    return h.digest()


def dhash(img: Image.Image) -> int | None:
    """64-bit difference hash of ``img`` (any size; JPEG draft-decoded at 1/8 is fine).

    Bit ``8*r + c`` (from the most significant) is set when the thumbnail pixel right of (r, c)
    is brighter. ``None`` for a nearly flat image."""
    try:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        thumb = rgb.resize(_THUMB, Image.Resampling.BOX).convert("L")
    except Exception:  # a hash is a hint only: never make a readable image unusable
        return None
    a = np.frombuffer(thumb.tobytes(), dtype=np.uint8).reshape(_THUMB[1], _THUMB[0])
    if int(a.max()) - int(a.min()) < _MIN_RANGE:
        return None
    return int.from_bytes(np.packbits(a[:, 1:] > a[:, :-1]).tobytes(), "big")


def thumbnail(img: Image.Image) -> np.ndarray | None:
    """The 32x32 greyscale thumbnail (float32) that confirms a candidate pair; ``None`` if it fails."""
    try:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.asarray(rgb.resize(_CONFIRM, Image.Resampling.BOX).convert("L"), dtype=np.float32)
    except Exception:
        return None


def similar(a: np.ndarray | None, b: np.ndarray | None, min_correlation: float = NEAR_MIN_CORRELATION) -> bool:
    """Whether two ``thumbnail``s correlate at least ``min_correlation`` (flat ones never do)."""
    if a is None or b is None:
        return False
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return denom > 0 and float((a * b).sum()) / denom >= min_correlation


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array."""
    x = np.ascontiguousarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x).astype(np.int64)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(axis=-1)


def near_pairs(hashes: Sequence[int] | np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> list[tuple[int, int, int]]:
    """All ``(i, j, distance)`` with ``i < j`` and ``popcount(h[i] ^ h[j]) <= max_bits``, sorted.

    Exact and sub-quadratic on real data (pigeonhole): the 64 bits are cut into ``max_bits + 1``
    pieces, and two hashes that close agree on at least one piece, so only hashes sharing a piece
    are compared (a sort and a slide per piece)."""
    h = np.asarray(hashes, dtype=np.uint64).ravel()
    n = len(h)
    if n < 2:
        return []
    max_bits = int(max_bits)
    pieces = max(1, min(64, max_bits + 1))
    bounds = np.linspace(0, 64, pieces + 1).round().astype(int)
    found_a, found_b = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        mask = np.uint64((1 << int(hi - lo)) - 1) if hi - lo < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        key = (h >> np.uint64(lo)) & mask
        order = np.argsort(key, kind="stable")
        k = key[order]
        d = 1
        while d < n:  # equal keys are contiguous after sorting: offsets 1..(largest group - 1)
            same = k[:-d] == k[d:]
            if not same.any():
                break
            a, b = order[:-d][same], order[d:][same]
            close = popcount(h[a] ^ h[b]) <= max_bits
            found_a.append(np.minimum(a, b)[close])
            found_b.append(np.maximum(a, b)[close])
            d += 1
    if not found_a:
        return []
    a = np.concatenate(found_a).astype(np.int64)
    b = np.concatenate(found_b).astype(np.int64)
    code = np.unique(a * n + b)
    a, b = code // n, code % n
    dist = popcount(h[a] ^ h[b])
    return [(int(i), int(j), int(k)) for i, j, k in zip(a, b, dist)]
