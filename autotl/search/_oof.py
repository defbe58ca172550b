"""Out-of-fold predictions: what the ensemble selection and the one-SE rule read from every trial."""

from __future__ import annotations

import torch

from ._folds import Selection


class OutOfFold:
    """Each scored image's class probabilities, averaged over the folds that scored it; with ``paths``,
    that many sets side by side (a probe's penalty path), probabilities then ``(paths, m, K)``."""

    def __init__(self, selection: Selection, num_classes: int, *, paths: int | None = None):
        self.rows = {str(s.path): i for i, s in enumerate(selection.scored_samples)}
        lead = () if paths is None else (int(paths),)
        self.sums = torch.zeros(*lead, len(self.rows), num_classes, dtype=torch.float64)
        self.counts = torch.zeros(len(self.rows), dtype=torch.float64)

    def add(self, samples, logits: torch.Tensor) -> None:
        self.add_probs(samples, torch.softmax(logits.double(), dim=-1))

    def add_probs(self, samples, probs: torch.Tensor) -> None:
        idx = torch.tensor([self.rows[str(s.path)] for s in samples], dtype=torch.long)
        self.sums.index_add_(self.sums.dim() - 2, idx, probs.double())
        self.counts.index_add_(0, idx, torch.ones(len(idx), dtype=torch.float64))

    def probs(self):
        return (self.sums / self.counts.clamp_min(1)[:, None]).numpy()
