"""Adaptive histograms of filter-bank responses (Ge & Yu 2017, §3.2 "Image Descriptor").

For every filter ``i`` the range ``[h_i^l, h_i^u]`` of its responses is taken from the *target*
domain and divided into bins "so that each of them contains a roughly equal percentage of
pixels": the interior bin edges are the equal-mass quantiles of the target responses
(:func:`fit_bin_edges`). Source (pool) responses outside the target range fall into the end bins.
An image's descriptor is the stack of its per-filter histograms, each normalised to sum to 1 and
smoothed by a small ``eps`` so that KL divergences stay finite (:func:`histograms`).

:func:`describe_folder` runs this over a list of image files in batches, with an on-disk cache
keyed by the files (path, size, mtime), the bank's key, the bin edges and the image size, so a
second run over the same pool only stats the files and loads one tensor.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from .._console import progress as _progress
from .._images import UnreadableImageError, load_rgb
from .._io import atomic_path
from ..errors import AutotlError
from .filterbanks import BaseFilterBank, _digest

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_N_BINS",
    "DEFAULT_EPS",
    "Described",
    "load_image",
    "load_images",
    "iter_image_batches",
    "fit_bin_edges",
    "responses_to_histograms",
    "histograms",
    "describe_folder",
]

DEFAULT_IMAGE_SIZE = 128  # shorter side resized to this, then centre-cropped to a square
DEFAULT_N_BINS = 32
DEFAULT_EPS = 1e-4  # additive smoothing of each normalised histogram (~1-2 pixels' worth)
_CACHE_FORMAT = "autotl.retrieval.histograms/v2"  # v2: images decoded by autotl._images.load_rgb

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------
# image loading
# --------------------------------------------------------------------------------------------


def load_image(path: PathLike, image_size: int = DEFAULT_IMAGE_SIZE) -> np.ndarray:
    """One image as uint8 (S, S, 3): decoded by :func:`autotl._images.load_rgb` (EXIF-oriented,
    RGB, alpha on white, 16-bit rescaled; large JPEGs decoded at a reduced DCT scale that keeps
    the shorter side >= ``image_size``), then the centred square resized to ``image_size``
    (bilinear, antialiased). An unreadable file raises ``AutotlError``."""
    try:
        img = load_rgb(path, draft_size=(image_size, image_size))
    except UnreadableImageError as e:
        raise AutotlError(f"cannot read image {os.fspath(path)}: {e.reason}; remove or re-save the file") from e
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2.0, (h - side) / 2.0
    img = img.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(img, dtype=np.uint8).copy()


def load_images(
    paths: Sequence[PathLike], image_size: int = DEFAULT_IMAGE_SIZE, *, pool: ThreadPoolExecutor | None = None
) -> torch.Tensor:
    """Images as float32 (B, 3, S, S) in [0, 1] (see :func:`load_image`)."""
    if len(paths) == 0:
        return torch.zeros(0, 3, image_size, image_size)
    if pool is not None:
        arrays = list(pool.map(lambda p: load_image(p, image_size), paths))
    else:
        arrays = [load_image(p, image_size) for p in paths]
    x = torch.from_numpy(np.stack(arrays))  # (B, S, S, 3) uint8
    return x.permute(0, 3, 1, 2).to(torch.float32).div_(255.0)


def iter_image_batches(
    paths: Sequence[PathLike], image_size: int = DEFAULT_IMAGE_SIZE, batch_size: int = 64, *, workers: int = 2
) -> Iterator[torch.Tensor]:
    """Yield (B, 3, S, S) batches in order; the next batch is decoded (PIL releases the GIL) by
    ``workers`` threads while the caller works on the current one."""
    paths = list(paths)
    if not paths:
        return
    batches = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        nxt = pool.submit(load_images, batches[0], image_size, pool=None)
        for i in range(len(batches)):
            cur = nxt
            if i + 1 < len(batches):
                nxt = pool.submit(load_images, batches[i + 1], image_size, pool=None)
            yield cur.result()


def _as_batches(images, image_size: int, batch_size: int) -> Iterator[torch.Tensor]:
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(images)
        for i in range(0, x.shape[0], batch_size):
            yield x[i : i + batch_size]
        return
    items = list(images) if not isinstance(images, list) else images
    if items and isinstance(items[0], (str, os.PathLike)):
        yield from iter_image_batches(items, image_size, batch_size)
    else:
        for x in items:
            yield torch.as_tensor(x)


# --------------------------------------------------------------------------------------------
# bin edges and histograms
# --------------------------------------------------------------------------------------------


def _files_digest(paths: Sequence[str]) -> tuple[list[str], bytes]:
    """(sorted absolute paths, bytes describing them with size and mtime)."""
    absolute = sorted(os.path.abspath(os.fspath(p)) for p in paths)
    parts = []
    for p in absolute:
        try:
            st = os.stat(p)
        except OSError as e:
            raise AutotlError(f"cannot read image {p}: {e}; check the path") from e
        parts.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n")
    return absolute, "".join(parts).encode("utf-8", "surrogateescape")


def _quantiles(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Linear-interpolated quantiles of each column of ``values`` (M, F) -> (F, len(q))."""
    v = torch.sort(values.T.contiguous(), dim=1).values  # (F, M): rows sort much faster
    m = v.shape[1]
    pos = q.to(torch.float64) * (m - 1)
    lo = pos.floor().long().clamp_(0, m - 1)
    hi = (lo + 1).clamp_(max=m - 1)
    frac = (pos - lo.to(torch.float64)).to(v.dtype).unsqueeze(0)
    return v[:, lo] + (v[:, hi] - v[:, lo]) * frac


def fit_bin_edges(
    bank: BaseFilterBank,
    target_images,
    n_bins: int = DEFAULT_N_BINS,
    max_samples_per_filter: int = 65_536,
    *,
    samples_per_image: int = 2048,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = 32,
    seed: int = 0,
    cache_dir: PathLike | None = None,
) -> torch.Tensor:
    """Equal-mass bin edges per filter from the *target* domain -> float32 (F, n_bins - 1).

    ``target_images``: a sequence of image paths (loaded like :func:`describe_folder`), a tensor
    (N, 3, H, W) in [0, 1], or an iterable of such batches. From every image ``samples_per_image``
    random response pixels are drawn (the same positions for all filters) and a uniform random
    subset of at most ``max_samples_per_filter`` of them is kept (priority sampling, so memory is
    bounded however many images there are). The interior edges are the ``i/n_bins`` quantiles;
    the outermost bins are open-ended, so responses outside the target range ``[h^l, h^u]`` are
    clipped into them. Deterministic for a given ``seed``. With ``cache_dir`` and path input the
    edges are cached like the histograms.
    """
    if n_bins < 2:
        raise ValueError("n_bins must be >= 2")
    cache_file = None
    if cache_dir is not None and isinstance(target_images, (list, tuple)) and target_images:
        if isinstance(target_images[0], (str, os.PathLike)):
            _, files = _files_digest(target_images)
            key = _digest(
                b"autotl.retrieval.edges/v2",  # v2: images decoded by autotl._images.load_rgb
                files,
                bank.key.encode(),
                repr((n_bins, max_samples_per_filter, samples_per_image, image_size, seed)).encode(),
            )
            cache_file = Path(cache_dir) / f"edges-{key[:32]}.pt"
            if cache_file.is_file():
                with contextlib.suppress(Exception):
                    edges = torch.load(cache_file, map_location="cpu", weights_only=True)
                    if edges.shape == (bank.num_filters, n_bins - 1):
                        return edges
    gen = torch.Generator().manual_seed(int(seed))
    vals_parts: list[torch.Tensor] = []
    keys_parts: list[torch.Tensor] = []
    held = 0

    def reduce() -> None:  # keep the rows with the smallest random keys: a uniform subsample
        nonlocal vals_parts, keys_parts, held
        vals, keys = torch.cat(vals_parts), torch.cat(keys_parts)
        if vals.shape[0] > max_samples_per_filter:
            keep = torch.topk(keys, max_samples_per_filter, largest=False).indices
            vals, keys = vals[keep], keys[keep]
        vals_parts, keys_parts, held = [vals], [keys], vals.shape[0]

    for batch in _as_batches(target_images, image_size, batch_size):
        if batch.shape[0] == 0:
            continue
        r = bank.responses(batch).detach().to("cpu", torch.float32)  # (B, F, h, w)
        B, Fn = r.shape[:2]
        flat = r.reshape(B, Fn, -1)
        P = flat.shape[2]
        if P > samples_per_image:
            pick = torch.rand(B, P, generator=gen).argsort(dim=1)[:, :samples_per_image]
            flat = flat.gather(2, pick.unsqueeze(1).expand(B, Fn, samples_per_image))
        vals = flat.permute(0, 2, 1).reshape(-1, Fn)  # (B*s, F)
        vals_parts.append(vals)
        keys_parts.append(torch.rand(vals.shape[0], generator=gen))
        held += vals.shape[0]
        if held > 2 * max_samples_per_filter:  # amortised: reduce only when twice over budget
            reduce()
    if not vals_parts:
        raise AutotlError("no target images to fit the histogram bins on; pass at least one target image")
    reduce()
    buf_vals = vals_parts[0]
    q = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    edges = _quantiles(buf_vals, q).to(torch.float32).contiguous()  # (F, n_bins-1)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            torch.save(edges, tmp)
    return edges


def responses_to_histograms(responses: torch.Tensor, edges: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Responses (B, F, h, w) -> smoothed normalised histograms (B, F, n_bins), float32.

    Bin ``j`` of filter ``f`` holds values in ``(edges[f, j-1], edges[f, j]]`` (bin 0 and the
    last bin are open-ended). One batched ``searchsorted`` over all filters and one ``bincount``
    with per-(image, filter) offsets; no Python loop over filters or pixels. Each histogram is
    ``(counts/n + eps) / (1 + n_bins*eps)``.
    """
    r = torch.as_tensor(responses)
    edges = torch.as_tensor(edges, dtype=r.dtype, device=r.device)
    B, Fn = r.shape[:2]
    if edges.ndim != 2 or edges.shape[0] != Fn:
        raise ValueError(f"edges must be (F={Fn}, n_bins-1), got {tuple(edges.shape)}")
    nb = edges.shape[1] + 1
    flat = r.reshape(B, Fn, -1).contiguous()
    n = flat.shape[2]
    idx = torch.searchsorted(edges.unsqueeze(0).expand(B, Fn, nb - 1).contiguous(), flat)
    idx += (torch.arange(B * Fn, device=idx.device) * nb).view(B, Fn, 1)
    counts = torch.bincount(idx.view(-1), minlength=B * Fn * nb).view(B, Fn, nb)
    hist = counts.to(torch.float32) / max(n, 1)
    return ((hist + eps) / (1.0 + nb * eps)).cpu()


def histograms(
    bank: BaseFilterBank, images: torch.Tensor, edges: torch.Tensor, *, eps: float = DEFAULT_EPS
) -> torch.Tensor:
    """Descriptors of images (B, 3, H, W) in [0, 1] -> (B, F, n_bins); see :func:`responses_to_histograms`."""
    return responses_to_histograms(bank.responses(images), edges, eps)


class Described(NamedTuple):
    hists: torch.Tensor  # (N, F, n_bins) float32, in the order of the given paths
    cache_hit: bool


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if not n:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def describe_folder(
    bank: BaseFilterBank,
    paths: Sequence[PathLike],
    edges: torch.Tensor,
    *,
    image_size: int = DEFAULT_IMAGE_SIZE,
    batch_size: int = 32,
    cache_dir: PathLike | None = None,
    eps: float = DEFAULT_EPS,
    show_progress: bool = True,
    num_threads: int | None = None,
    device: str | torch.device = "cpu",
) -> Described:
    """Histogram descriptors of image files -> ``Described(hists (N, F, n_bins), cache_hit)``.

    Images are loaded with :func:`load_image` (shorter side -> ``image_size``, centre crop),
    decoded in background threads while the previous batch is filtered. With ``cache_dir`` the
    result is stored as ``hist-<sha256>.pt``, keyed by the sorted absolute paths with their sizes
    and mtimes, the bank key, the edge values, the image size and ``eps``: a second call on
    unchanged files is a hit (returns the same tensor, in the order of ``paths``); touching,
    replacing, adding or removing a file is a miss. ``num_threads`` sets torch's intra-op threads
    for the call (default: leave torch's setting, which is all cores).
    """
    paths = [os.fspath(p) for p in paths]
    edges = torch.as_tensor(edges, dtype=torch.float32).contiguous()
    Fn, nb = edges.shape[0], edges.shape[1] + 1
    if Fn != bank.num_filters:
        raise ValueError(f"edges are for {Fn} filters, the bank has {bank.num_filters}")
    if not paths:
        return Described(torch.zeros(0, Fn, nb), False)
    absolute = [os.path.abspath(p) for p in paths]
    order = sorted(range(len(paths)), key=absolute.__getitem__)  # caller index of each sorted row
    cache_file = None
    if cache_dir is not None:
        _, files = _files_digest(absolute)
        key = _digest(
            _CACHE_FORMAT.encode(),
            files,
            bank.key.encode(),
            str(tuple(edges.shape)).encode(),
            edges.numpy().tobytes(),
            repr((int(image_size), float(eps))).encode(),
        )
        cache_file = Path(cache_dir) / f"hist-{key[:32]}.pt"
        if cache_file.is_file():
            try:
                blob = torch.load(cache_file, map_location="cpu", weights_only=True)
                h = blob["hists"]
                if blob.get("key") == key and h.shape == (len(paths), Fn, nb):
                    out = torch.empty_like(h)
                    out[torch.tensor(order)] = h
                    return Described(out, True)
            except Exception:  # unreadable / partial cache file: recompute and overwrite
                pass
    bank.to(device)
    out = torch.empty(len(paths), Fn, nb, dtype=torch.float32)
    bar = _progress(f"describing {len(paths)} images", total=len(paths)) if show_progress else None
    with _torch_threads(num_threads), torch.inference_mode(), bar or contextlib.nullcontext() as task:
        done = 0
        for batch in iter_image_batches(paths, image_size, batch_size):
            b = batch.shape[0]
            out[done : done + b] = histograms(bank, batch, edges, eps=eps)
            done += b
            if task is not None:
                task.advance(b)
    if cache_file is not None:
        with atomic_path(cache_file) as tmp:
            torch.save({"key": key, "format": _CACHE_FORMAT, "hists": out[torch.tensor(order)].contiguous()}, tmp)
    return Described(out, False)
