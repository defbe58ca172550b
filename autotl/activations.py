"""One mechanism for sharing frozen activations: ``SharedActivations`` in front of a ``FeatureExtractor``.

``FeatureExtractor`` keys its cache by the exact list of files, so every subset a run trains or
scores on — a cross-validation fold, a data-dropout subset, train+val for the refit, a relabelled
copy (the noise benchmarks) — would start a new forward pass. ``SharedActivations`` serves any list
whose *images* come from registered lists (train, val, test) by gathering rows of their cached
activations; the labels are the requested samples' own. Anything else goes to the extractor.
The run wraps every extractor in one of these, so trials, strategies and the refit share one pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .data import Sample
from .features import ActivationSet, FeatureExtractor


class SharedActivations:
    """A ``FeatureExtractor`` look-alike that reuses the activations of registered sample lists."""

    def __init__(self, extractor: FeatureExtractor, *lists: Sequence[Sample]):
        self.extractor = extractor
        self._lists: list[list[Sample]] = []
        self._where: dict[Path, tuple[int, int]] = {}
        for samples in lists:
            self.register(samples)

    def register(self, samples: Sequence[Sample]) -> None:
        """Make ``samples`` a source of rows (its activations are computed on first use)."""
        samples = list(samples)
        if not samples or any(samples == known for known in self._lists):
            return
        li = len(self._lists)
        self._lists.append(samples)
        for row, s in enumerate(samples):
            self._where.setdefault(s.path, (li, row))

    def __getattr__(self, name: str) -> Any:  # num_stages, map_bytes, forward_batches, source, cache_dir, ...
        return getattr(self.extractor, name)

    def extract(self, samples: Sequence[Sample], cuts: Sequence[int] = (), *, view: str = "center",
                description: str = "features") -> ActivationSet:
        samples = list(samples)
        if not samples or any(samples == known for known in self._lists):
            return self.extractor.extract(samples, cuts, view=view, description=description)
        where = [self._where.get(s.path) for s in samples]
        if any(w is None for w in where):
            return self.extractor.extract(samples, cuts, view=view, description=description)
        parts = sorted({li for li, _ in where})
        sets = {li: self.extractor.extract(self._lists[li], cuts, view=view, description=description) for li in parts}
        map_cuts, tap_cuts = list(sets[parts[0]].maps), list(sets[parts[0]].taps)
        # gather rows: one index per list, then put them back in the requested order
        order: list[int] = []
        pooled, logits, maps, taps = [], [], {c: [] for c in map_cuts}, {c: [] for c in tap_cuts}
        for li in parts:
            rows = [(i, r) for i, (l, r) in enumerate(where) if l == li]
            idx = torch.tensor([r for _, r in rows], dtype=torch.long)
            order += [i for i, _ in rows]
            acts = sets[li]
            pooled.append(acts.pooled[idx])
            logits.append(acts.source_logits[idx] if acts.source_logits is not None else None)
            for c in map_cuts:
                maps[c].append(acts.maps[c][idx])
            for c in tap_cuts:
                taps[c].append(acts.taps[c][idx])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return ActivationSet(
            labels=torch.tensor([s.label for s in samples], dtype=torch.long),
            pooled=torch.cat(pooled)[inverse],
            source_logits=None if any(p is None for p in logits) else torch.cat(logits)[inverse],
            maps={c: torch.cat(m)[inverse] for c, m in maps.items()},
            taps={c: torch.cat(t)[inverse] for c, t in taps.items()},
        )
