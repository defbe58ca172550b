"""Ensembles: greedy selection over out-of-fold predictions, and one module (one ONNX graph) for them.

Selection is Caruana et al.'s (2004) greedy forward selection with replacement, as AutoGluon does
it: start from nothing, and in each round add the candidate (possibly one already in) whose
addition gives the lowest log loss of the averaged out-of-fold probabilities; stop when no
addition lowers it. The weights are the pick counts, so every pick lowered the loss.

``EnsembleNet`` takes the input of its *primary* member (preprocessed as the card says) and gives
``log(Σ w_m softmax(z_m))``: log-probabilities are logits whose softmax is the averaged
probabilities, so ``predict`` and the parity check treat an ensemble like any model. A member
trained with other preprocessing (another input size or mean/std) gets the primary's input
converted in the graph: un-normalised, resized bilinearly to its size, normalised its way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .stages import InputAdapter, same_preprocessing

PROB_FLOOR = 1e-6  # log loss of a probability of 0 is infinite; every member is floored alike
MAX_ROUNDS = 25


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of ``labels`` under ``probs`` (rows sum to 1)."""
    p = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(p, PROB_FLOOR, 1.0)).mean())


@dataclass
class EnsembleSelection:
    """What ``greedy_ensemble`` chose: pick count per candidate and the loss after every pick."""

    counts: list[int]
    losses: list[float] = field(default_factory=list)  # losses[i]: after pick i + 1
    picks: list[int] = field(default_factory=list)

    @property
    def members(self) -> list[int]:
        return [i for i, c in enumerate(self.counts) if c > 0]

    @property
    def weights(self) -> list[float]:
        total = sum(self.counts)
        return [c / total for c in self.counts] if total else [0.0] * len(self.counts)

    def probs(self, candidates: Sequence[np.ndarray]) -> np.ndarray:
        return sum(w * np.asarray(p, dtype=np.float64) for w, p in zip(self.weights, candidates) if w > 0)


def greedy_ensemble(candidates: Sequence[np.ndarray], labels: np.ndarray, *, max_rounds: int = MAX_ROUNDS,
                    max_members: int | None = None) -> EnsembleSelection:
    """Greedy forward selection with replacement on out-of-fold probabilities (module docstring).

    ``candidates[i]`` is an ``(n, C)`` array of candidate i's out-of-fold probabilities on the same
    ``n`` images, ``labels`` their classes. A pick is made only when it strictly lowers the loss;
    ``max_members`` caps the number of distinct members.
    """
    if not candidates:
        return EnsembleSelection([])
    probs = [np.asarray(p, dtype=np.float64) for p in candidates]
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if any(p.shape[0] != n for p in probs):
        raise ValueError("every candidate needs one row of probabilities per label")
    counts = [0] * len(probs)
    total = np.zeros_like(probs[0])
    out = EnsembleSelection(counts)
    current = math.inf
    for r in range(max_rounds):
        best_i, best_loss = -1, current
        for i, p in enumerate(probs):
            if max_members is not None and counts[i] == 0 and len(out.members) >= max_members:
                continue
            loss = log_loss((total + p) / (r + 1), labels)
            if loss < best_loss - 1e-12:
                best_i, best_loss = i, loss
        if best_i < 0:
            break
        counts[best_i] += 1
        total += probs[best_i]
        current = best_loss
        out.losses.append(best_loss)
        out.picks.append(best_i)
    return out


class EnsembleNet(nn.Module):
    """Weighted average of member probabilities, returned as log-probabilities (module docstring).

    ``share_keys[i]`` names member i's frozen backbone (its source model): members with the same key
    and preprocessing compute their common frozen prefix once (their frozen stages are copies of
    the same source weights), so five probes on one backbone cost one backbone pass. Sharing needs
    members that are ``TransferNet``s (``forward_prefix`` / ``forward_from`` and ``frozen``).
    """

    def __init__(self, members: Sequence[nn.Module], weights: Sequence[float], data_configs: Sequence[dict],
                 share_keys: Sequence[str | None] | None = None):
        super().__init__()
        if not members or len(members) != len(weights) or len(members) != len(data_configs):
            raise ValueError("an ensemble needs one weight and one data config per member")
        total = float(sum(weights))
        self.members = nn.ModuleList(members)
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))
        primary = data_configs[0]
        self.adapters = nn.ModuleList(
            nn.Identity() if same_preprocessing(primary, cfg) else InputAdapter(primary, cfg) for cfg in data_configs)
        keys = list(share_keys) if share_keys is not None else [None] * len(members)
        groups: dict[Any, list[int]] = {}
        for i, key in enumerate(keys):
            shareable = key is not None and hasattr(members[i], "forward_prefix")
            groups.setdefault((key, repr(sorted(data_configs[i].items()))) if shareable else ("alone", i), []).append(i)
        # (members of the group, the cut they share): the prefix runs once, on the first member's copy
        self.groups = [(idx, min(int(members[i].frozen) for i in idx) if len(idx) > 1 else None) for idx in groups.values()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = None
        for idx, cut in self.groups:
            a = self.adapters[idx[0]](x)
            if cut is None:
                logits = [self.members[idx[0]](a)]
            else:
                shared = self.members[idx[0]].forward_prefix(a, cut)
                logits = [self.members[i].forward_from(shared, cut) for i in idx]
            for i, z in zip(idx, logits):
                p = torch.softmax(z.float(), dim=1) * self.weights[i]
                probs = p if probs is None else probs + p
        return torch.log(probs.clamp_min(PROB_FLOOR))


def encode_probs(probs: np.ndarray) -> str:
    """``(n, C)`` probabilities as compact text for a trial's user attributes (float32, base64)."""
    import base64

    a = np.ascontiguousarray(probs, dtype=np.float32)
    return f"{a.shape[0]}x{a.shape[1]}:" + base64.b64encode(a.tobytes()).decode("ascii")


def decode_probs(text: str) -> np.ndarray:
    import base64

    shape, data = text.split(":", 1)
    n, c = (int(v) for v in shape.split("x"))
    return np.frombuffer(base64.b64decode(data), dtype=np.float32).reshape(n, c).copy()


# ------------------------------------------------------------------------------ members of a fitted run
@dataclass
class EnsembleMember:
    """One refitted member (``autotl.fitted.Fitted``) and its weight."""

    fitted: Any
    weight: float
    name: str  # e.g. "trial 7"
    description: str = ""

    @property
    def source(self):
        return self.fitted.source


def _check_one_input(members: Sequence[EnsembleMember]) -> None:
    first = members[0].source.data_config
    for m in members[1:]:
        if not same_preprocessing(first, m.source.data_config):
            raise ValueError(f"ensemble member {m.name} expects other preprocessing than {members[0].name}; the members "
                             "of one run share the run's input (SourceModel.share_input)")


def ensemble_net(members: Sequence[EnsembleMember]) -> EnsembleNet:
    """One graph for the members: solved probes merged into one probe over the union of their
    layouts (each backbone computed once for all of them: ``autotl.probe.merge_probes``), trained
    nets beside it; members on the same backbone share its frozen prefix."""
    from .probe import merge_probes

    _check_one_input(members)
    probes = [m for m in members if getattr(m.fitted, "probe", None) is not None]
    parts: list[tuple[nn.Module, float, EnsembleMember]] = []
    if len(probes) > 1:
        extractors = probes[0].fitted.extractors
        merged = merge_probes([m.fitted.probe for m in probes], [m.weight for m in probes], extractors)
        parts.append((merged.net(extractors), sum(m.weight for m in probes), probes[0]))
    parts += [(m.fitted.net, m.weight, m) for m in members if len(probes) <= 1 or m not in probes]
    return EnsembleNet([net.cpu().eval() for net, _, _ in parts], [w for _, w, _ in parts],
                       [m.source.data_config for _, _, m in parts], share_keys=[m.source.label for _, _, m in parts])


@torch.no_grad()
def ensemble_logits(members: Sequence[EnsembleMember], samples) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, labels) of the ensemble on ``samples`` as its graph computes them, each
    member read through the run's activation caches."""
    _check_one_input(members)
    samples = list(samples)
    total = sum(m.weight for m in members)
    probs, labels = None, torch.tensor([s.label for s in samples], dtype=torch.long)
    for m in members:
        p = torch.softmax(m.fitted.logits(samples).double(), dim=1) * (m.weight / total)
        probs = p if probs is None else probs + p
    return torch.log(probs.clamp_min(PROB_FLOOR)).float(), labels


def latency_ms(net: nn.Module, data_config: dict, repeats: int = 5) -> float:
    """Median PyTorch CPU latency of one image (batch 1), in milliseconds."""
    import time

    c, h, w = data_config["input_size"]
    x = torch.rand(1, c, h, w)
    net = net.cpu().eval()
    times = []
    with torch.no_grad():
        net(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    return round(1000 * sorted(times)[len(times) // 2], 2)


__all__ = ["greedy_ensemble", "EnsembleSelection", "EnsembleNet", "EnsembleMember", "ensemble_net", "ensemble_logits",
           "latency_ms", "log_loss", "encode_probs", "decode_probs"]
