"""The distance of eq. (1) and exact K nearest neighbours in the source pool.

Ge & Yu 2017, eq. (1)::

    H(x_i^t, x_j^s) = sum_h w_h [ KL(phi_h^{i,t} || phi_h^{j,s}) + KL(phi_h^{j,s} || phi_h^{i,t}) ]

summed over all filter histograms ``h``, with ``w_h = 1/N_h`` where ``N_h`` is the number of
kernels of the layer (bank) the filter belongs to, so that layers with many kernels do not
dominate. With one bank all weights are equal, which does not change the ranking.

Matrix form, for histograms P (n, F, B) and Q (m, F, B), each row normalised per filter::

    symKL(p, q) = sum_f w_f sum_b (p - q)(log p - log q)
                = a(p) + a(q) - <w p, log q> - <log p, w q>,   a(p) = <w p, log p>

computed as one matrix product ``[w P, log P] @ [log Q, w Q]^T``. The logs are centred by
``log(1/B)`` (which cancels exactly because every histogram sums to 1 per filter), so for the
near-uniform histograms that equal-mass bins produce the terms are small and float32 loses no
accuracy to cancellation.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from .filterbanks import BaseFilterBank, filter_weights

__all__ = ["KnnResult", "pairwise_symmetric_kl", "knn", "retrieve", "combine_banks"]

_TINY = 1e-30


class KnnResult(NamedTuple):
    distances: torch.Tensor  # (n, k) float32, ascending per row
    indices: torch.Tensor  # (n, k) int64 into the pool


def _prepare(H, weights, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (w*H flattened, centred log H flattened, a(H) = <w H, log H>)."""
    H = torch.as_tensor(H).to(dtype)
    if H.ndim != 3:
        raise ValueError(f"histograms must be (n, F, n_bins), got {tuple(H.shape)}")
    n, Fn, nb = H.shape
    w = (
        torch.ones(Fn, dtype=dtype)
        if weights is None
        else torch.as_tensor(weights).to(dtype).reshape(-1)
    )
    if w.shape[0] != Fn:
        raise ValueError(f"weights has {w.shape[0]} entries for {Fn} filters")
    L = torch.log(H.clamp_min(_TINY)) + math.log(nb)
    Hw = H * w.view(1, Fn, 1)
    a = (Hw * L).sum(dim=(1, 2))
    return Hw.reshape(n, -1), L.reshape(n, -1), a


def _distances(qx: torch.Tensor, qa: torch.Tensor, pool_chunk, weights, dtype) -> torch.Tensor:
    Pw, PL, pa = _prepare(pool_chunk, weights, dtype)
    d = torch.cat([PL, Pw], dim=1)  # pairs with qx = [Qw, QL]
    D = qa.unsqueeze(1) + pa.unsqueeze(0) - qx @ d.T
    return D.clamp_min_(0.0)


def pairwise_symmetric_kl(
    P, Q, weights=None, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Eq. (1) between every row of P (n, F, B) and of Q (m, F, B) -> (n, m) in ``dtype``.

    ``weights`` (F,) are the per-filter ``w_h`` (default 1 each; use :func:`filter_weights` /
    ``bank.filter_weights()`` for ``1/N_h``). Histograms must be strictly positive and sum to 1
    per filter (as :func:`~autotl.retrieval.descriptors.histograms` returns them).
    Non-negative, symmetric, and 0 (up to rounding) on identical histograms.
    """
    Qw, QL, qa = _prepare(P, weights, dtype)
    return _distances(torch.cat([Qw, QL], dim=1), qa, Q, weights, dtype)


def _pack(d: torch.Tensor, offset: int) -> torch.Tensor:
    """float32 distances >= 0 and their column index -> int64 keys ordered by (distance, index)."""
    d = d.to(torch.float32).clamp_min(0.0) + 0.0  # + 0.0 turns -0.0 into +0.0
    bits = d.view(torch.int32).to(torch.int64)
    idx = torch.arange(offset, offset + d.shape[1], dtype=torch.int64).unsqueeze(0)
    return (bits << 32) | idx


def _unpack(keys: torch.Tensor) -> KnnResult:
    idx = keys & 0xFFFFFFFF
    dist = (keys >> 32).to(torch.int32).view(torch.float32)
    return KnnResult(dist.contiguous(), idx.contiguous())


def knn(
    query_hists,
    pool_hists,
    k: int,
    *,
    weights=None,
    chunk_size: int = 4096,
    query_chunk_size: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> KnnResult:
    """Exact K nearest pool items of every query under eq. (1) -> ``KnnResult(distances, indices)``.

    Both (n, F, B) / (m, F, B). The pool is processed ``chunk_size`` rows at a time (memory
    O(n * (chunk_size + k))), the queries ``query_chunk_size`` rows at a time; the running best K
    are merged with each chunk by ``topk``. Rows are sorted by ascending distance; equal
    distances (as float32) are ordered by pool index, lowest first. ``k = 0`` gives empty (n, 0)
    results; ``k`` larger than the pool is an error.
    """
    Q = torch.as_tensor(query_hists)
    P = torch.as_tensor(pool_hists)
    n, m = Q.shape[0], P.shape[0]
    k = int(k)
    if k < 0:
        raise ValueError("k must be >= 0")
    if k > m:
        raise ValueError(f"k={k} is larger than the pool ({m} items)")
    if Q.ndim != 3 or P.ndim != 3 or Q.shape[1:] != P.shape[1:]:
        raise ValueError(f"query {tuple(Q.shape)} and pool {tuple(P.shape)} must be (n, F, B) with equal F, B")
    if k == 0 or n == 0:
        return KnnResult(torch.zeros(n, k, dtype=torch.float32), torch.zeros(n, k, dtype=torch.int64))
    chunk_size = max(1, int(chunk_size))
    dist_parts, idx_parts = [], []
    for q0 in range(0, n, max(1, int(query_chunk_size))):
        Qw, QL, qa = _prepare(Q[q0 : q0 + query_chunk_size], weights, dtype)
        qx = torch.cat([Qw, QL], dim=1)
        best: torch.Tensor | None = None
        for p0 in range(0, m, chunk_size):
            D = _distances(qx, qa, P[p0 : p0 + chunk_size], weights, dtype)
            keys = _pack(D, p0)
            if best is not None:
                keys = torch.cat([best, keys], dim=1)
            kk = min(k, keys.shape[1])
            best = torch.topk(keys, kk, dim=1, largest=False, sorted=True).values
        res = _unpack(best)
        dist_parts.append(res.distances)
        idx_parts.append(res.indices)
    return KnnResult(torch.cat(dist_parts), torch.cat(idx_parts))


def combine_banks(
    query: Sequence[torch.Tensor] | torch.Tensor,
    pool: Sequence[torch.Tensor] | torch.Tensor,
    *,
    banks: Sequence[BaseFilterBank] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate per-bank histograms along the filter axis -> (query, pool, weights).

    The weight of each filter is ``1/N_h`` of its layer: layers come from ``banks`` (their
    ``groups``), from explicit ``groups`` (one tuple of layer sizes per bank), or, by default,
    each bank's tensor is one layer. All banks must use the same number of bins.
    """
    qs = [query] if isinstance(query, torch.Tensor) else list(query)
    ps = [pool] if isinstance(pool, torch.Tensor) else list(pool)
    if len(qs) != len(ps):
        raise ValueError("query and pool need one histogram tensor per bank each")
    if banks is not None:
        grp = [tuple(b.groups) for b in banks]
    elif groups is not None:
        grp = [tuple(g) for g in groups]
    else:
        grp = [(int(torch.as_tensor(q).shape[1]),) for q in qs]
    if len(grp) != len(qs):
        raise ValueError("one bank / group spec per histogram tensor")
    for q, g in zip(qs, grp):
        if torch.as_tensor(q).shape[1] != sum(g):
            raise ValueError(f"histograms have {torch.as_tensor(q).shape[1]} filters, layers say {sum(g)}")
    weights = filter_weights([n for g in grp for n in g])
    cat = lambda xs: torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in xs], dim=1)  # noqa: E731
    return cat(qs), cat(ps), weights


def retrieve(
    query: Sequence[torch.Tensor] | torch.Tensor,
    pool: Sequence[torch.Tensor] | torch.Tensor,
    k: int,
    *,
    banks: Sequence[BaseFilterBank] | None = None,
    groups: Sequence[Sequence[int]] | None = None,
    chunk_size: int = 4096,
    dtype: torch.dtype = torch.float32,
) -> KnnResult:
    """K-NN under eq. (1) over one or several banks' histograms (weights ``1/N_h`` per layer).

    ``query`` / ``pool``: one (n, F_b, B) tensor per bank (or a single tensor); see
    :func:`combine_banks` for the weighting, :func:`knn` for the search.
    """
    q, p, w = combine_banks(query, pool, banks=banks, groups=groups)
    return knn(q, p, k, weights=w, chunk_size=chunk_size, dtype=dtype)
