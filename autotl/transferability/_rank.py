"""Rank statistics for comparing source-model scores, plus array plumbing shared by the metrics.

- `kendall_tau(a, b)`: Kendall's tau-b (tie-corrected), numpy only.
- `combine_ranks(table, metrics)`: mean rank of each model across several metrics.

The `_as_*` helpers turn numpy arrays / torch tensors / sequences into float64 / int64 numpy
arrays so every metric computes in float64 whatever it is given.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["kendall_tau", "combine_ranks"]


# --------------------------------------------------------------------------- array plumbing


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if hasattr(x, "is_floating_point") and x.is_floating_point():
            x = x.double()
        return x.numpy()
    return np.asarray(x)


def _as_float64(x: Any, name: str, ndim: int) -> np.ndarray:
    """`x` as a C-contiguous float64 array with `ndim` dims and only finite values."""
    arr = np.ascontiguousarray(_to_numpy(x), dtype=np.float64)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _as_labels(labels: Any, n: int) -> tuple[np.ndarray, int]:
    """Labels (any ints) -> (codes in 0..K-1 as int64, K). Checks length `n`."""
    lab = _to_numpy(labels)
    if lab.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {lab.shape}")
    if lab.shape[0] != n:
        raise ValueError(f"labels has {lab.shape[0]} entries but there are {n} samples")
    if lab.dtype.kind not in "iub":
        if lab.dtype.kind == "f" and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise ValueError(f"labels must be integers, got dtype {lab.dtype}")
    _, codes = np.unique(lab, return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    return codes, int(codes.max()) + 1


def _check_probs(p: np.ndarray, name: str) -> None:
    """Rows of `p` must be probability vectors (catches logits passed by mistake)."""
    if (p < -1e-9).any() or not np.allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-4):
        raise ValueError(
            f"{name} must hold probabilities (rows >= 0 summing to 1); "
            "apply autotl.transferability.softmax to source-head logits first"
        )


# --------------------------------------------------------------------------- rank statistics


def kendall_tau(a: Any, b: Any) -> float:
    """Kendall's tau-b between two score vectors (ties handled; NaN if either is constant).

    tau_b = (n_c - n_d) / sqrt((n_0 - n_1) (n_0 - n_2)) with n_0 = n(n-1)/2 pairs, n_c / n_d
    concordant / discordant pairs, n_1 / n_2 pairs tied in `a` / in `b`. Same value as
    `scipy.stats.kendalltau(a, b)` (variant "b"). O(n^2) memory: meant for ranking a handful to a
    few thousand models, not samples.
    """
    x = _as_float64(a, "a", 1)
    y = _as_float64(b, "b", 1)
    if x.shape != y.shape:
        raise ValueError(f"a and b must have the same length, got {x.shape[0]} and {y.shape[0]}")
    n = x.shape[0]
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    sx = np.sign(x[:, None] - x[None, :])[iu]
    sy = np.sign(y[:, None] - y[None, :])[iu]
    n0 = sx.size
    s = float(np.sum(sx * sy))  # = n_c - n_d (pairs tied in either contribute 0)
    n1 = int(np.count_nonzero(sx == 0))
    n2 = int(np.count_nonzero(sy == 0))
    denom = math.sqrt(float(n0 - n1) * float(n0 - n2))
    if denom == 0.0:
        return float("nan")
    return s / denom


def _rank_desc(values: np.ndarray) -> np.ndarray:
    """Ranks with 1 = highest value; ties get the average rank; NaN ranks after all finite."""
    v = np.where(np.isnan(values), -np.inf, values)
    order = np.argsort(-v, kind="stable")
    sorted_v = v[order]
    # group equal values (NaN were mapped to -inf, so they tie with each other, last)
    starts = np.r_[0, np.flatnonzero(sorted_v[1:] != sorted_v[:-1]) + 1]
    ends = np.r_[starts[1:], sorted_v.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
    group_rank = np.repeat(avg, ends - starts)
    ranks = np.empty_like(group_rank)
    ranks[order] = group_rank
    return ranks


def combine_ranks(table: dict[str, dict[str, float]], metrics: list[str]) -> dict[str, float]:
    """Mean rank of each model across `metrics` (rank 1 = best = highest score).

    `table` maps model name -> {metric name -> score}. Within one metric, tied scores share the
    average rank and a NaN score ranks after every finite one. Returns {model: mean rank}, in
    the order of `table`; sort ascending to get the recommended order.
    """
    if not metrics:
        raise ValueError("combine_ranks needs at least one metric")
    models = list(table)
    if not models:
        return {}
    for m in models:
        missing = [k for k in metrics if k not in table[m]]
        if missing:
            raise ValueError(f"model {m!r} has no score for metric(s) {missing}")
    total = np.zeros(len(models))
    for k in metrics:
        vals = np.array([float(table[m][k]) for m in models], dtype=np.float64)
        total += _rank_desc(vals)
    mean = total / len(metrics)
    return {m: float(r) for m, r in zip(models, mean)}
