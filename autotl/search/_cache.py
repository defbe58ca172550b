"""The trial cache: one ``FeatureExtractor`` per source model, shared by every trial.

``FeatureExtractor`` keys its cache by the exact list of files, so a trial that trains on a
*subset* of the training images (data dropout) or on train+val (``--refit-on-val``) would start
a new forward pass. ``SharedActivations`` sits in front of the extractor and serves any list of
samples drawn from registered lists (train, val, test) by gathering rows of their cached
activations; anything else goes to the extractor unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..data import Sample
from ..features import ActivationSet, FeatureExtractor


class SharedActivations:
    """A ``FeatureExtractor`` look-alike that reuses the activations of registered sample lists."""

    def __init__(self, extractor: FeatureExtractor, *lists: Sequence[Sample]):
        self.extractor = extractor
        self._lists: list[list[Sample]] = []
        self._where: dict[Sample, tuple[int, int]] = {}
        for samples in lists:
            self.register(samples)

    def register(self, samples: Sequence[Sample]) -> None:
        samples = list(samples)
        if not samples:
            return
        li = len(self._lists)
        self._lists.append(samples)
        for row, s in enumerate(samples):
            self._where.setdefault(s, (li, row))

    def __getattr__(self, name: str) -> Any:  # num_stages, map_bytes, forward_batches, source, ...
        return getattr(self.extractor, name)

    def prefetch(self, cuts: Sequence[int], description: str = "features") -> None:
        """One pass per registered list that caches every cut a trial may ask for."""
        for samples in self._lists:
            self.extractor.extract(samples, cuts, description=description)

    def extract(self, samples: Sequence[Sample], cuts: Sequence[int] = (), *, description: str = "features") -> ActivationSet:
        samples = list(samples)
        if not samples or any(samples == known for known in self._lists):
            return self.extractor.extract(samples, cuts, description=description)
        where = [self._where.get(s) for s in samples]
        if any(w is None for w in where):
            return self.extractor.extract(samples, cuts, description=description)
        parts = sorted({li for li, _ in where})
        sets = {li: self.extractor.extract(self._lists[li], cuts, description=description) for li in parts}
        # gather rows: one index per list, then put them back in the requested order
        order, pieces = [], {k: [] for k in ("pooled", "logits", *[f"cut{c}" for c in sets[parts[0]].maps])}
        for li in parts:
            rows = [(i, r) for i, (l, r) in enumerate(where) if l == li]
            idx = torch.tensor([r for _, r in rows], dtype=torch.long)
            order += [i for i, _ in rows]
            acts = sets[li]
            pieces["pooled"].append(acts.pooled[idx])
            pieces["logits"].append(acts.source_logits[idx] if acts.source_logits is not None else None)
            for c, m in acts.maps.items():
                pieces[f"cut{c}"].append(m[idx])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        logits = None if any(p is None for p in pieces["logits"]) else torch.cat(pieces["logits"])[inverse]
        return ActivationSet(
            labels=torch.tensor([s.label for s in samples], dtype=torch.long),
            pooled=torch.cat(pieces["pooled"])[inverse],
            source_logits=logits,
            maps={c: torch.cat(pieces[f"cut{c}"])[inverse] for c in sets[parts[0]].maps},
        )
