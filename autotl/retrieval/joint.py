"""Selective joint fine-tuning (Ge & Yu 2017, §3.1 and §4.1): one shared backbone, two heads.

The strategy adds :class:`JointFineTuningHooks` (``autotl.train.TrainingHooks``, built by
``joint_hooks`` from a :class:`JointData`: the source pool, the neighbour search, K0, the source-loss
weight) to the one training loop: the pool partners are the hooks' extra rows, the source-head loss
their extra term, eq. 3 their per-round callback. Training returns a ``TrainResult`` whose ``net`` is
a plain ``TransferNet`` for the *target* task: the source head is the hooks' module, trained beside it
and dropped at the end (export sees the target classes only). ``train_joint`` is that loop with
those hooks, for callers outside a strategy (benchmarks).

Every mini-batch holds B target images and, for each, one pool image drawn uniformly from that
target's current neighbour set (its first K_i exact nearest pool images under eq. 1). Both halves
go through the shared trainable stages together (their batch-norm statistics are the mixed
batch's, as in the paper); after pooling, target features go to the target head and pool
features to the source head (the pool's own label space)::

    loss = CE_target(target head, target labels)
         + source_weight * mean_i w(y_i) * CE_source(source head, pool labels)

with ``w`` the per-pool-class DATL weights (mean 1 over the pool) or 1. Each head therefore only
ever gets gradient from its own domain; the shared stages get both.

Hard samples (eq. 2-3, ``HardSampleSchedule``): the epochs are split into R = min(max_rounds,
epochs) rounds; after each round but the last, the target training images are classified (eval
mode) and K_i grows by 4 K0 for a wrong prediction and by 2 K0 for a right one with entropy >= 0.1
nats above the entropy of the label-smoothed target (``smoothing_entropy``: with smoothing every
fitted prediction keeps that much, and the paper's delta presumes none). The K-NN is searched
once for the largest count any image can reach and sliced. Each round is an iteration of
fine-tuning as in the paper ("continue fine-tuning the model trained in the current iteration"):
``train_model`` gives every round its own learning-rate schedule (round 0 warms up; each later
round restarts at the full rate with the enlarged neighbour sets and decays by cosine over its own
epochs), and no early stopping reaches back across rounds: the model returned is the last round's.
The decision images' score after every epoch is kept per round in the notes (``val_score``).

With a frozen prefix the activations at the cut are cached like ``train_model`` does: the
target's through ``FeatureExtractor.extract``; the pool's only for the partners actually drawn
(one extract per epoch for the ones not seen yet; the draws are seeded, so a rerun hits the disk
cache), kept in an in-memory store shared by the trials of a search. With all stages frozen there
is no shared trainable layer, the source task cannot influence the target, and training falls back
to ``train_model``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .. import _console
from .._csv import safe_row
from .._images import load_rgb
from .._io import atomic_path
from .._memory import BoundedMemory
from ..data import Sample
from ..device import DevicePolicy, as_policy
from ..features import FeatureExtractor, ImageDataset, eval_transform, make_loader, train_transform
from ..models import SourceModel
from ..stages import TransferNet, resolve_frozen, staged_backbone
from ..train import EpochMetrics, TrainConfig, TrainingHooks, TrainingSetup, TrainResult, train_model
from .knn import KnnResult
from .pool import SourcePool
from .schedule import HardSampleSchedule

__all__ = ["JointData", "JointFineTuningHooks", "train_joint", "joint_step_loss", "round_boundaries", "smoothing_entropy",
           "random_neighbours", "write_retrieval_csv"]


@dataclass
class JointData:
    """What the joint trainer needs beyond ``train_model``'s arguments."""

    pool: SourcePool
    neighbours: Callable[[Sequence[Sample], int], KnnResult]  # (targets, k) -> exact K-NN into pool.samples
    k0: int
    source_weight: float = 1.0
    max_rounds: int = 5  # the paper's five iterations; scaled down to the epoch budget
    delta: float = 0.1
    class_weights: np.ndarray | None = None  # (pool classes,) w(y), mean 1 over pool images; None = 1
    source_head_init: str = "imagenet"  # "imagenet": source model's classifier rows for wnid classes; "random"
    partner_seed: int | None = None  # seed of the pool-partner draws (None: config.seed)
    csv_path: Path | None = None  # write retrieval.csv here after training (the final fit)
    target_classes: Sequence[str] | None = None
    notes: dict[str, Any] = field(default_factory=dict)  # filled by training (rounds, counts, pool images used)
    memory: BoundedMemory | None = None  # the run's: pool activations kept across its trainings (None: per training)


def smoothing_entropy(label_smoothing: float, num_classes: int) -> float:
    """Entropy (nats) of the label-smoothed one-hot target: what a perfectly fitted net predicts.

    Eq. (3)'s delta = 0.1 presumes training without label smoothing; with smoothing epsilon every
    well-fitted prediction already has this entropy (0.199 nats for epsilon = 0.1 and 2 classes),
    so the trainer counts a right prediction as uncertain when its entropy is >= delta + this."""
    eps, c = float(label_smoothing), int(num_classes)
    if eps <= 0 or c < 2:
        return 0.0
    p = torch.full((c,), eps / c, dtype=torch.float64)
    p[0] += 1.0 - eps
    return float(-(p * p.log()).sum())


def round_boundaries(epochs: int, max_rounds: int) -> list[int]:
    """Start epoch of each round: R = min(max_rounds, epochs) rounds of (nearly) equal length."""
    epochs = max(1, int(epochs))
    r = max(1, min(int(max_rounds), epochs))
    return [int(math.floor(i * epochs / r)) for i in range(r)]


def random_neighbours(n_pool: int, seed: int = 0) -> Callable[[Sequence[Sample], int], KnnResult]:
    """A neighbour function drawing, per target image, k distinct *random* pool images (the
    "random source samples" ablation: same counts, same schedule, no similarity)."""

    def fn(samples: Sequence[Sample], k: int) -> KnnResult:
        k = min(int(k), n_pool)
        rows = []
        for s in samples:
            h = int.from_bytes(hashlib.sha256(f"{seed}\0{os.fspath(s.path)}".encode()).digest()[:8], "little")
            g = torch.Generator().manual_seed(h % (2**63))
            rows.append(torch.randperm(n_pool, generator=g)[:k])
        idx = torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.long)
        return KnnResult(torch.full(idx.shape, float("nan")), idx)

    return fn


def _source_loss(features: torch.Tensor, labels: torch.Tensor, source_head: nn.Module, *,
                 sample_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """mean_i w(y_i) CE(source head, pool label) over pool rows' pooled ``features``; 0 for none."""
    if not features.shape[0]:
        return features.new_zeros(()).float()
    ce = nn.functional.cross_entropy(source_head(features).float(), labels, label_smoothing=label_smoothing,
                                     reduction="none")
    return (ce * sample_weights).mean() if sample_weights is not None else ce.mean()


def joint_step_loss(features: torch.Tensor, n_target: int, y_target: torch.Tensor, y_source: torch.Tensor,
                    target_head: nn.Module, source_head: nn.Module, *, source_weight: float = 1.0,
                    sample_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, target CE, source CE) for pooled ``features`` whose first ``n_target`` rows are target
    images and the rest pool images: the loss of one joint step, as ``train_model``'s target
    cross-entropy plus ``JointFineTuningHooks.extra_loss`` make it. Target rows only reach the
    target head, pool rows only the source head; an empty half contributes 0."""
    ft, fs = features[:n_target], features[n_target:]
    loss_t = (nn.functional.cross_entropy(target_head(ft).float(), y_target, label_smoothing=label_smoothing)
              if n_target else features.new_zeros(()).float())
    loss_s = _source_loss(fs, y_source, source_head, sample_weights=sample_weights, label_smoothing=label_smoothing)
    return loss_t + float(source_weight) * loss_s, loss_t, loss_s


# --------------------------------------------------------------------------- pool activations


class _PoolStore:
    """Activations at one cut of pool images, keyed by path, grown one extract per round."""

    def __init__(self):
        self.rows: dict[str, int] = {}
        self.data: torch.Tensor | None = None
        self.extracted = 0  # pool images pushed through the frozen prefix by this store

    def ensure(self, extractor, samples: list[Sample], cut: int) -> None:
        missing = [s for s in samples if os.fspath(s.path) not in self.rows]
        if not missing:
            return
        acts = extractor.extract(missing, [cut], description="pool features")
        x = acts.at(cut, extractor.num_stages)
        start = 0 if self.data is None else self.data.shape[0]
        self.data = x.clone() if self.data is None else torch.cat([self.data, x])
        for i, s in enumerate(missing):
            self.rows[os.fspath(s.path)] = start + i
        self.extracted += len(missing)

    def row(self, path: str | os.PathLike) -> torch.Tensor:
        return self.data[self.rows[os.fspath(path)]]

    @property
    def nbytes(self) -> int:
        return 0 if self.data is None else int(self.data.nbytes)


def _store_for(source: SourceModel, cut: int, memory: BoundedMemory | None) -> _PoolStore:
    """The pool activations of ``source`` at ``cut``: kept in ``memory`` (two models or cuts at a time)."""
    if memory is None:
        return _PoolStore()
    dc = {k: list(v) if isinstance(v, tuple) else v for k, v in source.data_config.items()}
    key = json.dumps([source.label, source.input_id, dc, int(cut)], sort_keys=True, default=str)
    return memory.part("pool-activations", 2).get(key, _PoolStore)


class _PartnerDataset(Dataset):
    """Item i: (input, pool label) of target image i's pool partner: its activation at the cut from
    ``store`` (cached path) or the decoded, augmented image. ``partner`` is redrawn every epoch;
    loader workers are started per epoch (not persistent), so they see the new draw."""

    def __init__(self, pool: Sequence[Sample], n_targets: int, *, store: _PoolStore | None = None, transform=None):
        self.pool = list(pool)
        self.store, self.transform = store, transform
        self.partner = torch.zeros(n_targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.partner)

    def __getitem__(self, i: int):
        s = self.pool[int(self.partner[i])]
        x = self.store.row(s.path) if self.store is not None else self.transform(load_rgb(s.path))
        return x, s.label


# --------------------------------------------------------------------------- the trainer


def _source_head(net: TransferNet, source: SourceModel, pool: SourcePool, init: str, seed: int) -> tuple[nn.Linear, str]:
    dim = net.head.in_features
    head = nn.Linear(dim, pool.num_classes)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        bound = 1.0 / dim**0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    if init != "imagenet":
        return head, "random"
    cls = source.model.get_classifier() if source.num_source_classes else None
    mapped = [(ci, idx) for ci, idx in enumerate(pool.imagenet_index) if idx is not None]
    if not isinstance(cls, nn.Linear) or cls.in_features != dim or cls.out_features != 1000 or not mapped:
        return head, "random (no ImageNet-1k classifier rows for this pool)"
    with torch.no_grad():
        for ci, idx in mapped:
            head.weight[ci].copy_(cls.weight[idx])
            if cls.bias is not None:
                head.bias[ci].copy_(cls.bias[idx])
    return head, f"imagenet rows ({len(mapped)}/{pool.num_classes} classes)"


@torch.no_grad()
def _probs_cached(net: TransferNet, x: torch.Tensor, cut: int, policy: DevicePolicy, batch: int = 256) -> torch.Tensor:
    net.eval()
    out = []
    for i in range(0, len(x), batch):
        with policy.autocast():
            logits = net.forward_from(policy.format_input(x[i:i + batch].to(policy.device).float()), cut)
        out.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, net.head.out_features)


@torch.no_grad()
def _probs_images(net: TransferNet, samples: Sequence[Sample], transform, policy: DevicePolicy,
                  batch: int) -> torch.Tensor:
    net.eval()
    loader = make_loader(ImageDataset(samples, transform), batch_size=max(batch, 64), shuffle=False, device=policy)
    out = []
    for x, _, _ in loader:
        with policy.autocast():
            logits = net(policy.format_input(x.to(policy.device, non_blocking=True)))
        out.append(torch.softmax(logits.float(), 1).cpu())
    return torch.cat(out)


class JointFineTuningHooks(TrainingHooks):
    """What makes ``train_model`` the joint trainer: each target image's pool partner as an extra
    row, the source-head loss as the extra term, eq. 3 at the end of each round. Holds one run's
    state (neighbours, counts, rounds, partners); ``write_notes`` reports it into ``joint.notes``."""

    progress_label = "joint training"

    def __init__(self, joint: JointData, source: SourceModel, train_samples: Sequence[Sample], num_classes: int,
                 config: TrainConfig):
        self.joint, self.source, self.config = joint, source, config
        self.train_samples = list(train_samples)
        n, pool = len(self.train_samples), joint.pool
        self.round_starts = round_boundaries(config.epochs, joint.max_rounds)
        self.delta = joint.delta + smoothing_entropy(config.label_smoothing, num_classes)
        self.schedule = HardSampleSchedule(joint.k0, delta=self.delta, max_rounds=len(self.round_starts))
        self.kmax = min(self.schedule.max_count, len(pool))
        self.knn = joint.neighbours(self.train_samples, self.kmax)
        self.nb_idx = self.knn.indices[:, :self.kmax].long()
        self.counts = self.schedule.initial_counts(n).clamp(max=self.kmax)
        self.counts_by_round = [self.counts.clone()]
        self.extra_cache_images = min(len(pool), n * self.kmax)  # at most this many pool images get drawn
        self.class_weights = (torch.as_tensor(joint.class_weights, dtype=torch.float32)
                              if joint.class_weights is not None else None)
        seed = config.seed if joint.partner_seed is None else int(joint.partner_seed)
        self.partner_gen = torch.Generator().manual_seed(seed + 12345)
        self.rounds: list[dict[str, Any]] = []
        self.used_pool: set[int] = set()
        self.pool_seconds = 0.0
        self.source_loss_sum, self.source_rows = 0.0, 0  # this epoch's
        # set by setup(), once train_model has built the net
        self.run: TrainingSetup | None = None
        self.source_head: nn.Linear | None = None
        self.head_init = ""
        self.store: _PoolStore | None = None  # cached path only
        self.store_extracted_before = 0
        self.partners: _PartnerDataset | None = None

    def setup(self, run: TrainingSetup) -> nn.Module:
        self.run = run
        pool = self.joint.pool
        self.source_head, self.head_init = _source_head(run.net, self.source, pool, self.joint.source_head_init,
                                                        self.config.seed)
        if run.cached:
            self.store = _store_for(self.source, run.cut, self.joint.memory)
            self.store_extracted_before = self.store.extracted
        self.partners = _PartnerDataset(pool.samples, len(self.train_samples), store=self.store,
                                        transform=None if run.cached else train_transform(self.source.data_config))
        self._start_round(0)
        return self.source_head

    def extra_dataset(self) -> Dataset:
        return self.partners

    def start_epoch(self, epoch: int) -> None:
        n, pool = len(self.train_samples), self.joint.pool
        # one partner per target image for this epoch: uniform over its first K_i neighbours
        pos = (torch.rand(n, generator=self.partner_gen) * self.counts.float()).long().clamp(max=self.kmax - 1)
        partner = self.nb_idx[torch.arange(n), pos] if n else torch.zeros(0, dtype=torch.long)
        self.used_pool.update(partner.tolist())
        if self.store is not None:  # the prefix activations of this epoch's partners that are not cached yet
            t0 = time.monotonic()
            self.store.ensure(self.run.extractor, [pool.samples[int(j)] for j in torch.unique(partner)], self.run.cut)
            self.pool_seconds += time.monotonic() - t0
        self.partners.partner = partner
        self.source_loss_sum, self.source_rows = 0.0, 0

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        w = self.class_weights[labels.cpu()].to(labels.device) if self.class_weights is not None else None
        loss = _source_loss(features, labels, self.source_head, sample_weights=w,
                            label_smoothing=self.config.label_smoothing)
        self.source_loss_sum += loss.item() * len(labels)
        self.source_rows += len(labels)
        return float(self.joint.source_weight) * loss

    def end_epoch(self, metrics: EpochMetrics) -> None:
        self.rounds[-1].setdefault("source_loss", []).append(round(self.source_loss_sum / max(1, self.source_rows), 4))
        self.rounds[-1].setdefault("val_score", []).append(round(float(metrics.score(self.config.objective)), 4))

    def end_round(self, round_idx: int) -> None:
        """Eq. 3: classify the target training images, grow the hard ones' neighbour counts."""
        run = self.run
        policy = as_policy(run.policy if run.policy is not None else run.device)
        if run.cached:
            probs = _probs_cached(run.net, run.train_inputs, run.cut, policy)
        else:
            probs = _probs_images(run.net, self.train_samples, eval_transform(self.source.data_config), policy,
                                  self.config.batch_size)
        cat = self.schedule.classify(probs, run.train_labels)
        self.rounds[-1].update({"wrong": int((cat == 2).sum()), "uncertain": int((cat == 1).sum())})
        self.counts = self.schedule.next_counts(probs, run.train_labels, self.counts, round_idx).clamp(max=self.kmax)
        self.counts_by_round.append(self.counts.clone())
        self._start_round(round_idx + 1)

    def _start_round(self, round_idx: int) -> None:
        n = len(self.train_samples)
        self.rounds.append({"round": round_idx, "start_epoch": self.round_starts[round_idx],
                            "pool_images": int(len(_selected(self.nb_idx, self.counts))),
                            "mean_k": round(float(self.counts.float().mean()), 3) if n else 0.0,
                            "max_k": int(self.counts.max()) if n else 0})

    def finish(self, result: TrainResult) -> None:
        self.write_notes(result.seconds)

    def write_notes(self, seconds: float) -> None:
        """What the run did, into ``joint.notes``; ``retrieval.csv`` too when ``joint.csv_path`` is set."""
        joint, cached = self.joint, self.store is not None
        joint.notes.update({
            "joint": True, "k0": joint.k0, "rounds_planned": len(self.round_starts), "rounds_run": len(self.rounds),
            "round_starts": self.round_starts, "k_searched": self.kmax, "delta": round(self.delta, 4),
            "rounds": self.rounds, "pool_images_used": len(self.used_pool), "source_weight": joint.source_weight,
            "source_head_init": self.head_init, "cached_prefix": cached, "pool_prefix_seconds": round(self.pool_seconds, 3),
            "pool_prefix_images": self.store.extracted - self.store_extracted_before if cached else 0,
            "train_seconds": round(seconds, 3),
        })
        if joint.csv_path is not None:
            write_retrieval_csv(joint.csv_path, self.train_samples, joint.pool, self.knn, self.counts_by_round,
                                joint.target_classes)
            joint.notes["csv"] = str(joint.csv_path)


def joint_hooks(joint: JointData, source: SourceModel, train_samples: Sequence[Sample], num_classes: int,
                config: TrainConfig, extractor: FeatureExtractor | None = None) -> "JointFineTuningHooks | None":
    """The hooks that make the training loop joint fine-tuning; None when every stage is frozen (no
    shared trainable layer: the source task could not change the target, so only the head trains)."""
    n_stages = extractor.num_stages if extractor is not None else len(staged_backbone(source.model)[0])
    if resolve_frozen(config.frozen_stages, n_stages) >= n_stages:
        joint.notes.update({"joint": False, "reason": "all stages frozen: no shared trainable layer, trained the target head only"})
        _console.log("retrieval: all stages frozen, so the source task cannot change the target; training the target head only")
        return None
    return JointFineTuningHooks(joint, source, train_samples, num_classes, config)


def train_joint(
    source: SourceModel,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    num_classes: int,
    config: TrainConfig,
    *,
    extractor: FeatureExtractor | None = None,
    device: torch.device | str | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    deadline: float | None = None,
    joint: JointData,
) -> TrainResult:
    """``train_model`` with the joint fine-tuning hooks (module docstring)."""
    hooks = joint_hooks(joint, source, train_samples, num_classes, config, extractor)
    return train_model(source, train_samples, val_samples, num_classes, config, extractor=extractor, device=device,
                       on_epoch=on_epoch, deadline=deadline, hooks=hooks)


def _selected(nb_idx: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if nb_idx.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    mask = torch.arange(nb_idx.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    return torch.unique(nb_idx[mask])


def write_retrieval_csv(path: str | os.PathLike, targets: Sequence[Sample], pool: SourcePool, knn: KnnResult,
                        counts_by_round: Sequence[torch.Tensor], target_classes: Sequence[str] | None = None) -> Path:
    """``retrieval.csv``: one row per (target image, neighbour it used): target path and class,
    rank (1 = nearest), pool path and class, eq. (1) distance, and the round (0-based) in which
    the hard-sample schedule gave the target that many neighbours."""
    path = Path(path)
    counts = torch.stack([torch.as_tensor(c) for c in counts_by_round])  # (rounds, n)
    final = counts[-1]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["target_path", "target_class", "rank", "pool_path", "pool_class", "distance", "round"])
            for i, t in enumerate(targets):
                tclass = target_classes[t.label] if target_classes is not None else str(t.label)
                for r in range(int(final[i])):
                    j = int(knn.indices[i, r])
                    joined = int((counts[:, i] <= r).sum())  # first round whose count exceeds r
                    d = float(knn.distances[i, r])
                    w.writerow(safe_row([os.fspath(t.path), tclass, r + 1, os.fspath(pool.samples[j].path),
                                         pool.classes[pool.samples[j].label], "" if math.isnan(d) else f"{d:.6g}", joined]))
    return path
