"""Target -> pool nearest neighbours under eq. (1), computed once per (pool, bank, target set).

``PoolRetrieval`` holds one filter-bank choice (``"gabor"``, ``"conv"``, ``"firstconvs"`` or a "+"-join), the
equal-mass bin edges fitted on the *target training split* and the descriptors of every pool
image; ``neighbours(samples, k)`` returns the exact K-NN (distances and pool indices, ascending)
of any list of target images, describing images it has not seen (val images added by a refit on
train+val, say) with the same edges. Descriptors and edges go through the on-disk cache of
:func:`~autotl.retrieval.descriptors.describe_folder` / :func:`fit_bin_edges`, and
``get_retrieval`` keeps whole ``PoolRetrieval`` objects in the run's memory (bounded), so the trials
of a search that vary K0 or the source-loss weight pay for the descriptors once (and a second run
only for loading them).
"""

from __future__ import annotations

import collections.abc
import hashlib
import itertools
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import torch

from .._console import log
from .._memory import BoundedMemory
from ..data import Sample
from ..errors import AutotlError
from .descriptors import DEFAULT_IMAGE_SIZE, DEFAULT_N_BINS, describe_folder, fit_bin_edges
from .filterbanks import FILTER_BANKS, BaseFilterBank, create_filter_bank
from .knn import KnnResult, retrieve
from .pool import SourcePool

__all__ = ["BANKS", "PoolRetrieval", "create_banks", "get_retrieval", "retrieval_stats"]


class _BankChoices(collections.abc.Sequence):
    """The ``retrieval_bank`` values, read from ``FILTER_BANKS`` on every use (so a registered bank
    is accepted at once): each registered bank, then every "+"-join of several in registry order.
    Only the registry order is accepted ("gabor+conv", not "conv+gabor"): one name per bank set,
    so caches keyed by the name are not split."""

    def _all(self) -> list[str]:
        names = FILTER_BANKS.names()
        return ["+".join(c) for r in range(1, len(names) + 1) for c in itertools.combinations(names, r)]

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        names = FILTER_BANKS.names()
        parts = value.split("+")
        if not all(p in names for p in parts):
            return False
        ranks = [names.index(p) for p in parts]
        return all(a < b for a, b in zip(ranks, ranks[1:]))

    def __iter__(self) -> collections.abc.Iterator[str]:
        return iter(self._all())

    def __getitem__(self, i):
        return self._all()[i]

    def __len__(self) -> int:
        return 2 ** len(FILTER_BANKS) - 1

    def __repr__(self) -> str:
        return repr(tuple(self))


BANKS = _BankChoices()  # ("gabor", "conv", "gabor+conv") with the built-in banks
MAX_EDGE_IMAGES = 512  # bin edges are quantiles: a few hundred target images pin them down

_KEPT = 4  # PoolRetrieval objects a run keeps
_COUNTS = ("described_images", "edge_fits", "knn_calls", "memory_hits")


def _retrievals(memory: BoundedMemory) -> BoundedMemory:
    return memory.part("retrieval", _KEPT)


def retrieval_stats(memory: BoundedMemory) -> dict[str, int]:
    """What retrieval computed in ``memory`` (a run's): images pushed through a filter bank, edge fits
    (not served from disk), K-NN searches, ``get_retrieval`` hits."""
    counts = _retrievals(memory).counts
    return {k: int(counts[k]) for k in _COUNTS}


def create_banks(name: str, source_model: torch.nn.Module | None = None) -> list[BaseFilterBank]:
    """The banks of one ``retrieval_bank`` value (see ``BANKS``): ``"gabor"`` (48 Gabor filters),
    ``"conv"`` (the source model's stem and first block stage; first stage only where two are not
    supported), ``"firstconvs"`` (the paper's best bank: the responses after the activation of the
    source model's first two convolutions followed by a non-linearity), or any "+"-join of them."""
    name = str(name or "gabor").strip().lower()
    if name not in BANKS:
        raise AutotlError(f"retrieval_bank {name!r}: use one of {', '.join(BANKS)}")
    return [create_filter_bank(part, source_model) for part in name.split("+")]


def _paths_digest(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(f"{p}\0missing\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _edge_subset(paths: Sequence[str], n: int) -> list[str]:
    """At most ``n`` of the paths, evenly spaced in sorted order (deterministic, class-balanced-ish)."""
    paths = sorted(paths)
    if len(paths) <= n:
        return paths
    step = len(paths) / n
    return [paths[int(i * step)] for i in range(n)]


class PoolRetrieval:
    """One bank choice + target-fitted edges + pool descriptors; exact K-NN for target images."""

    def __init__(self, pool: SourcePool, bank: str, banks: list[BaseFilterBank], edges: list[torch.Tensor], *,
                 cache_dir: str | os.PathLike | None, image_size: int, n_bins: int, show_progress: bool = True,
                 counts: Counter | None = None):
        self.pool = pool
        self.bank = bank
        self.banks = banks
        self.edges = edges
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.image_size = int(image_size)
        self.n_bins = int(n_bins)
        self.show_progress = show_progress
        self.pool_hists: list[torch.Tensor] = []
        self.timings: dict[str, float] = {}
        self.pool_cache_hit = False
        self._rows: dict[str, int] = {}  # target path -> row of self._target[b]
        self._target: list[torch.Tensor] = [torch.zeros(0, b.num_filters, n_bins) for b in banks]
        self._knn: dict[tuple, KnnResult] = {}
        self.counts = counts if counts is not None else Counter()  # what it computed (``retrieval_stats``)

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in [*self.pool_hists, *self._target, *self.edges])

    # descriptors ------------------------------------------------------------------------------
    def _describe(self, paths: list[str], what: str) -> tuple[list[torch.Tensor], bool]:
        out, hit = [], True
        for bank, edges in zip(self.banks, self.edges):
            d = describe_folder(bank, paths, edges, image_size=self.image_size, cache_dir=self.cache_dir,
                                show_progress=self.show_progress)
            if not d.cache_hit:
                self.counts["described_images"] += len(paths)
            hit = hit and d.cache_hit
            out.append(d.hists)
        return out, hit

    def describe_pool(self) -> None:
        t0 = time.monotonic()
        self.pool_hists, self.pool_cache_hit = self._describe(self.pool.paths, "pool")
        self.timings["pool_descriptors_s"] = time.monotonic() - t0

    def target_descriptors(self, paths: Sequence[str]) -> list[torch.Tensor]:
        """Descriptors of target images (rows in the order of ``paths``), computing the unseen ones."""
        paths = [os.fspath(p) for p in paths]
        missing = sorted({p for p in paths if p not in self._rows})
        if missing:
            t0 = time.monotonic()
            new, _ = self._describe(missing, "target")
            start = self._target[0].shape[0]
            self._target = [torch.cat([old, h]) for old, h in zip(self._target, new)]
            for i, p in enumerate(missing):
                self._rows[p] = start + i
            self.timings["target_descriptors_s"] = self.timings.get("target_descriptors_s", 0.0) + time.monotonic() - t0
        idx = torch.tensor([self._rows[p] for p in paths], dtype=torch.long)
        return [t[idx] for t in self._target]

    # search -------------------------------------------------------------------------------------
    def neighbours(self, samples: Sequence[Sample | str | os.PathLike], k: int) -> KnnResult:
        """Exact K nearest pool images of each sample under eq. (1): distances (n, k) ascending,
        indices (n, k) into ``pool.samples`` (ties by lower pool index). ``k`` is capped by the pool."""
        paths = [os.fspath(s.path if isinstance(s, Sample) else s) for s in samples]
        k = min(int(k), len(self.pool))
        key = (tuple(paths), k)
        hit = self._knn.get(key)
        if hit is not None:
            return hit
        for (p2, k2), res in self._knn.items():  # a larger search over the same targets: slice it
            if p2 == key[0] and k2 >= k:
                return KnnResult(res.distances[:, :k], res.indices[:, :k])
        query = self.target_descriptors(paths)
        t0 = time.monotonic()
        res = retrieve(query, self.pool_hists, k, banks=self.banks)
        self.timings["knn_s"] = time.monotonic() - t0
        self.counts["knn_calls"] += 1
        self._knn = {key: res}  # keep the latest (largest) only
        return res

    def describe_state(self) -> dict[str, Any]:
        return {
            "bank": self.bank,
            "bank_keys": [b.key for b in self.banks],
            "bank_description": "; ".join(b.describe() for b in self.banks),
            "n_filters": sum(b.num_filters for b in self.banks),
            "n_bins": self.n_bins,
            "image_size": self.image_size,
            "pool_cache_hit": self.pool_cache_hit,
            **{k: round(v, 3) for k, v in self.timings.items()},
        }


def get_retrieval(pool: SourcePool, bank: str, fit_samples: Sequence[Sample | str], *, source_model=None,
                  cache_dir: str | os.PathLike | None = None, image_size: int = DEFAULT_IMAGE_SIZE,
                  n_bins: int = DEFAULT_N_BINS, seed: int = 0, show_progress: bool = True,
                  memory: BoundedMemory | None = None) -> tuple[PoolRetrieval, bool]:
    """The ``PoolRetrieval`` for (pool, bank, edges fitted on ``fit_samples``) -> (it, memory hit),
    kept in ``memory`` (a run's; without one it is built each time).

    The edges come from at most ``MAX_EDGE_IMAGES`` of the fit images (evenly spaced by path);
    those images' descriptors are computed here too, so the first K-NN query costs only the search.
    """
    banks = create_banks(bank, source_model)
    paths = [os.fspath(s.path if isinstance(s, Sample) else s) for s in fit_samples]
    if not paths:
        raise AutotlError("selective joint fine-tuning needs target training images to fit the histogram bins on")
    key = hashlib.sha256(repr((pool.fingerprint, [b.key for b in banks], _paths_digest(paths), int(image_size),
                               int(n_bins), int(seed), str(cache_dir))).encode()).hexdigest()
    kept = _retrievals(memory) if memory is not None else None
    counts = kept.counts if kept is not None else Counter()
    if kept is not None and key in kept:
        counts["memory_hits"] += 1
        return kept.get(key, None), True

    def build() -> PoolRetrieval:
        t0 = time.monotonic()
        edge_paths = _edge_subset(paths, MAX_EDGE_IMAGES)
        edges = []
        for b in banks:
            before = None if cache_dir is None else set(Path(cache_dir).glob("edges-*.pt"))
            edges.append(fit_bin_edges(b, edge_paths, n_bins, image_size=image_size, seed=seed, cache_dir=cache_dir))
            if before is None or set(Path(cache_dir).glob("edges-*.pt")) != before:
                counts["edge_fits"] += 1
        r = PoolRetrieval(pool, bank, banks, edges, cache_dir=cache_dir, image_size=image_size, n_bins=n_bins,
                          show_progress=show_progress, counts=counts)
        r.timings["edges_s"] = time.monotonic() - t0
        r.describe_pool()
        r.target_descriptors(paths)
        n = len(pool)
        log(f"retrieval: {n} pool images described with {bank} "
            + ("(cache hit)" if r.pool_cache_hit else f"in {r.timings['pool_descriptors_s']:.1f}s "
               f"({n / max(r.timings['pool_descriptors_s'], 1e-9):.0f} images/s)"))
        return r

    return (kept.get(key, build) if kept is not None else build()), False
