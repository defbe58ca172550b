"""Iterative retrieval for hard target samples (Ge & Yu 2017, §3.2, eq. 2-3).

After fine-tuning round ``m`` every target training sample gets the entropy of its softmax
prediction (eq. 2, natural log, *not* normalised by log C)::

    H_i^m = - sum_c p_{i,c}^m log p_{i,c}^m

and its number of source nearest neighbours for the next round is (eq. 3)::

    K_i^{m+1} = K_i^m + sigma0   if the prediction is wrong
              = K_i^m + sigma1   if it is right and H_i^m >= delta
              = K_i^m            otherwise

with ``delta = 0.1``, ``sigma0 = 4 K0``, ``sigma1 = 2 K0``, all samples starting at ``K0``, and
"we stop after five iterations": five fine-tuning rounds, i.e. at most four count updates, so no
count exceeds ``K0 + 4 * sigma0 = 17 K0`` (:attr:`HardSampleSchedule.max_count`; retrieve that
many neighbours once and slice).
"""

from __future__ import annotations

import torch

__all__ = ["prediction_entropy", "HardSampleSchedule", "selected_pool_indices", "EASY", "UNCERTAIN", "WRONG"]

EASY, UNCERTAIN, WRONG = 0, 1, 2


def prediction_entropy(probs) -> torch.Tensor:
    """Eq. (2): ``-sum_c p log p`` per row, natural log, un-normalised (0 log 0 = 0) -> (n,)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    return -torch.special.xlogy(p, p).sum(dim=1).to(torch.float32)


class HardSampleSchedule:
    """Eq. (3) with the paper's constants; ``round_idx`` counts fine-tuning rounds from 0."""

    def __init__(
        self,
        k0: int,
        delta: float = 0.1,
        max_rounds: int = 5,
        *,
        sigma0: int | None = None,
        sigma1: int | None = None,
    ):
        if int(k0) < 1:
            raise ValueError("k0 must be >= 1")
        if int(max_rounds) < 1:
            raise ValueError("max_rounds must be >= 1")
        self.k0 = int(k0)
        self.delta = float(delta)
        self.max_rounds = int(max_rounds)
        self.sigma0 = 4 * self.k0 if sigma0 is None else int(sigma0)
        self.sigma1 = 2 * self.k0 if sigma1 is None else int(sigma1)

    def __repr__(self) -> str:
        return (
            f"HardSampleSchedule(k0={self.k0}, delta={self.delta}, max_rounds={self.max_rounds}, "
            f"sigma0={self.sigma0}, sigma1={self.sigma1})"
        )

    @property
    def max_count(self) -> int:
        """The largest count any sample can reach: ``k0 + (max_rounds - 1) * max(sigma0, sigma1)``."""
        return self.k0 + (self.max_rounds - 1) * max(self.sigma0, self.sigma1, 0)

    def initial_counts(self, n: int) -> torch.Tensor:
        """(n,) int64, all ``k0`` (round 0)."""
        return torch.full((int(n),), self.k0, dtype=torch.int64)

    def has_next(self, round_idx: int) -> bool:
        """Whether another round follows round ``round_idx`` (0-based)."""
        return int(round_idx) + 1 < self.max_rounds

    def classify(self, probs, labels) -> torch.Tensor:
        """(n,) int64: ``WRONG`` (argmax != label), ``UNCERTAIN`` (right, entropy >= delta), ``EASY``."""
        p = torch.as_tensor(probs, dtype=torch.float32)
        y = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if p.ndim != 2 or p.shape[0] != y.shape[0]:
            raise ValueError(f"probs must be (n, C) and labels (n,), got {tuple(p.shape)} and {tuple(y.shape)}")
        if p.numel() and (bool((p < -1e-6).any()) or bool(((p.sum(1) - 1).abs() > 1e-3).any())):
            raise ValueError("probs must be softmax probabilities (rows >= 0 summing to 1), not logits")
        wrong = p.argmax(dim=1) != y
        uncertain = prediction_entropy(p) >= self.delta
        cat = torch.full_like(y, EASY)
        cat[uncertain] = UNCERTAIN
        cat[wrong] = WRONG
        return cat

    def next_counts(self, probs, labels, counts, round_idx: int) -> torch.Tensor:
        """Eq. (3): counts for round ``round_idx + 1`` from the predictions after round ``round_idx``.

        ``probs`` (n, C) softmax outputs on the target training samples, ``labels`` (n,),
        ``counts`` (n,) the current K_i. Raises ``ValueError`` after the last round.
        """
        if not self.has_next(round_idx):
            raise ValueError(f"round {round_idx} is the last of {self.max_rounds}; there is no next round")
        c = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
        cat = self.classify(probs, labels)
        if cat.shape != c.shape:
            raise ValueError(f"counts has {c.shape[0]} entries for {cat.shape[0]} samples")
        step = torch.zeros_like(c)
        step[cat == WRONG] = self.sigma0
        step[cat == UNCERTAIN] = self.sigma1
        return c + step


def selected_pool_indices(indices, counts) -> torch.Tensor:
    """The source subset of a round: the union over targets i of their first ``counts[i]``
    neighbours (``indices`` (n, k) from :func:`~autotl.retrieval.knn.knn`, k >= max(counts))
    -> sorted unique int64 pool indices."""
    idx = torch.as_tensor(indices, dtype=torch.int64)
    c = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
    if idx.ndim != 2 or idx.shape[0] != c.shape[0]:
        raise ValueError("indices must be (n, k) and counts (n,)")
    if c.numel() and int(c.max()) > idx.shape[1]:
        raise ValueError(f"counts go up to {int(c.max())} but only {idx.shape[1]} neighbours were retrieved")
    mask = torch.arange(idx.shape[1]).unsqueeze(0) < c.unsqueeze(1)
    return torch.unique(idx[mask])
