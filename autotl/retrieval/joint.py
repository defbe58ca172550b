"""Selective joint fine-tuning (Ge & Yu 2017, §3.1 and §4.1): one shared backbone, two heads.

``train_joint`` has the signature of ``autotl.train.train_model`` plus one keyword, ``joint``
(a :class:`JointData`: the source pool, the neighbour search, K0, the source-loss weight), so a
strategy sets ``ctx.train_fn = functools.partial(train_joint, joint=data)``. It returns a
``TrainResult`` whose ``net`` is a plain ``TransferNet`` for the *target* task: the source head
lives beside it and is dropped at the end (export sees the target classes only).

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
once for the largest count any image can reach and sliced.

With a frozen prefix the activations at the cut are cached like ``train_model`` does: the
target's through ``FeatureExtractor.extract``; the pool's only for the partners actually drawn
(one extract per epoch for the ones not seen yet; the draws are seeded, so a rerun hits the disk
cache), kept in an in-memory store shared by the trials of a search. With all stages frozen there is no shared trainable layer, the source
task cannot influence the target, and training falls back to ``train_model``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .. import _console
from .._images import load_rgb
from .._io import atomic_path
from ..data import Sample
from ..features import FeatureExtractor, eval_transform, make_loader, train_transform
from ..models import SourceModel
from ..stages import TransferNet
from ..train import (
    OBJECTIVES,
    EpochMetrics,
    TrainConfig,
    TrainResult,
    _backward_and_step,
    _EarlyStopping,
    _evaluate,
    _forward,
    _make_regularizer,
    _optimizer,
    _suffix_input,
    _SuffixView,
    _warmup_cosine,
    pick_device,
    set_seed,
    should_cache,
    train_model,
)
from .knn import KnnResult
from .pool import SourcePool
from .schedule import HardSampleSchedule

__all__ = ["JointData", "train_joint", "joint_step_loss", "round_boundaries", "smoothing_entropy", "random_neighbours",
           "write_retrieval_csv", "pool_store_stats"]


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


class _JointView(nn.Module):
    """The trained part: activation at ``cut`` -> pooled features; the two heads sit beside it.
    Regularisers bind to this module (``net.stages.i`` addresses work as with ``_SuffixView``)."""

    def __init__(self, net: TransferNet, source_head: nn.Linear, cut: int):
        super().__init__()
        self.net = net
        self.source_head = source_head
        self.cut = cut

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features_from(a, self.cut)


def joint_step_loss(features: torch.Tensor, n_target: int, y_target: torch.Tensor, y_source: torch.Tensor,
                    target_head: nn.Module, source_head: nn.Module, *, source_weight: float = 1.0,
                    sample_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, target CE, source CE) for pooled ``features`` whose first ``n_target`` rows are target
    images and the rest pool images. Target rows only reach the target head, pool rows only the
    source head; an empty half contributes 0."""
    ft, fs = features[:n_target], features[n_target:]
    zero = features.new_zeros(()).float()
    loss_t = nn.functional.cross_entropy(target_head(ft).float(), y_target, label_smoothing=label_smoothing) if n_target else zero
    if fs.shape[0]:
        ce = nn.functional.cross_entropy(source_head(fs).float(), y_source, label_smoothing=label_smoothing, reduction="none")
        loss_s = (ce * sample_weights).mean() if sample_weights is not None else ce.mean()
    else:
        loss_s = zero
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

    def gather(self, samples_paths: list[str]) -> torch.Tensor:
        return self.data[torch.tensor([self.rows[p] for p in samples_paths], dtype=torch.long)]


_STORES: "OrderedDict[str, _PoolStore]" = OrderedDict()
_STORE_LIMIT = 2


def _store_for(source: SourceModel, cut: int) -> _PoolStore:
    dc = {k: list(v) if isinstance(v, tuple) else v for k, v in source.data_config.items()}
    key = json.dumps([source.label, source.weights_id, dc, int(cut)], sort_keys=True, default=str)
    store = _STORES.get(key)
    if store is None:
        store = _STORES[key] = _PoolStore()
        while len(_STORES) > _STORE_LIMIT:
            _STORES.popitem(last=False)
    _STORES.move_to_end(key)
    return store


def pool_store_stats() -> dict[str, int]:
    return {"stores": len(_STORES), "pool_rows": sum(len(s.rows) for s in _STORES.values())}


class _PairDataset(Dataset):
    """(target image, target label, pool image, pool label) with the pool partner set per epoch."""

    def __init__(self, targets: Sequence[Sample], pool: Sequence[Sample], transform):
        self.targets = list(targets)
        self.pool = list(pool)
        self.transform = transform
        self.partner = torch.zeros(len(self.targets), dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        t, s = self.targets[i], self.pool[int(self.partner[i])]
        return self.transform(load_rgb(t.path)), t.label, self.transform(load_rgb(s.path)), s.label, i


class _ImageList(Dataset):
    def __init__(self, samples: Sequence[Sample], transform):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        return self.transform(load_rgb(self.samples[i].path)), self.samples[i].label


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
def _probs_cached(net: TransferNet, x: torch.Tensor, cut: int, device, batch: int = 256) -> torch.Tensor:
    net.eval()
    out = [torch.softmax(net.forward_from(x[i:i + batch].to(device).float(), cut).float(), 1).cpu()
           for i in range(0, len(x), batch)]
    return torch.cat(out) if out else torch.zeros(0, net.head.out_features)


@torch.no_grad()
def _probs_images(net: TransferNet, samples: Sequence[Sample], transform, device, batch: int) -> torch.Tensor:
    net.eval()
    loader = make_loader(_ImageList(samples, transform), batch_size=max(batch, 64), shuffle=False, device=device)
    return torch.cat([torch.softmax(net(x.to(device)).float(), 1).cpu() for x, _ in loader])


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
    """``train_model`` with a source task trained jointly on retrieved pool images (module docstring)."""
    cfg = config
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    device = pick_device(device) if not isinstance(device, torch.device) else device
    notes = joint.notes
    set_seed(cfg.seed)
    start = time.monotonic()
    net = TransferNet.from_source(source.model, num_classes, cfg.frozen_stages, seed=cfg.seed)
    cut = net.frozen
    if cut >= net.num_stages:
        notes.update({"joint": False, "reason": "all stages frozen: no shared trainable layer, trained the target head only"})
        _console.log("retrieval: all stages frozen, so the source task cannot change the target; training the target head only")
        return train_model(source, train_samples, val_samples, num_classes, cfg, extractor=extractor, device=device,
                           on_epoch=on_epoch, deadline=deadline)
    train_samples, val_samples = list(train_samples), list(val_samples)
    pool = joint.pool
    n = len(train_samples)
    starts = round_boundaries(cfg.epochs, joint.max_rounds)
    delta = joint.delta + smoothing_entropy(cfg.label_smoothing, num_classes)
    schedule = HardSampleSchedule(joint.k0, delta=delta, max_rounds=len(starts))
    kmax = min(schedule.max_count, len(pool))
    knn = joint.neighbours(train_samples, kmax)
    nb_idx = knn.indices[:, :kmax].long()
    counts = schedule.initial_counts(n).clamp(max=kmax)
    counts_by_round = [counts.clone()]

    source_head, head_init = _source_head(net, source, pool, joint.source_head_init, cfg.seed)
    pool_labels = torch.as_tensor(pool.labels)
    class_w = torch.as_tensor(joint.class_weights, dtype=torch.float32) if joint.class_weights is not None else None

    if extractor is None:
        extractor = FeatureExtractor(source, device=device)
    approx_pool = min(len(pool), n * kmax)
    cached = should_cache(extractor, n + len(val_samples) + approx_pool, cut, cfg.use_cache)
    val_acts = extractor.extract(val_samples, [cut], description="val features")
    val_x, val_y = val_acts.at(cut, net.num_stages), val_acts.labels
    store, tr_x, tr_y, pair_ds, loader = None, None, None, None, None
    if cached:
        tr = extractor.extract(train_samples, [cut], description="train features")
        tr_x, tr_y = tr.at(cut, net.num_stages), tr.labels
        store = _store_for(source, cut)
    else:
        pair_ds = _PairDataset(train_samples, pool.samples, train_transform(source.data_config))
        loader = make_loader(pair_ds, batch_size=cfg.batch_size, shuffle=True, device=device, seed=cfg.seed)
    extracted0 = store.extracted if store is not None else 0

    use_cuda = device.type == "cuda"
    net.to(device)
    source_head.to(device)
    view = _JointView(net, source_head, cut)
    target_view = _SuffixView(net, cut)
    reg = _make_regularizer(cfg, view)
    if reg is not None and getattr(reg, "source_model", None) is not None:
        reg.source_model.to(device)
    params = [p for p in view.parameters() if p.requires_grad]
    opt = _optimizer(net, cfg)
    opt.add_param_group({"params": list(source_head.parameters()), "lr": cfg.lr})
    steps_per_epoch = max(1, math.ceil(n / cfg.batch_size))
    sched = _warmup_cosine(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    lam_schedule = None
    if reg is not None:
        from ..regularizers import CoefficientSchedule

        lam_schedule = CoefficientSchedule(cfg.reg_lambda if cfg.regularizer != "l2sp" or cfg.reg_lambda > 0 else 1.0, cfg.reg_decay)

    set_seed(cfg.seed)
    gen = torch.Generator().manual_seed((cfg.seed if joint.partner_seed is None else int(joint.partner_seed)) + 12345)
    order_gen = torch.Generator().manual_seed(cfg.seed)
    history: list[EpochMetrics] = []
    rounds: list[dict[str, Any]] = []
    stopper = _EarlyStopping(cfg.objective, cfg.patience)
    round_idx, pool_seconds = 0, 0.0
    used_pool: set[int] = set()

    def start_round() -> None:
        selected = _selected(nb_idx, counts)
        rounds.append({"round": round_idx, "start_epoch": starts[round_idx], "pool_images": int(len(selected)),
                       "mean_k": round(float(counts.float().mean()), 3) if n else 0.0, "max_k": int(counts.max()) if n else 0})

    start_round()
    with _console.progress("joint training", total=cfg.epochs) as bar:
        for epoch in range(cfg.epochs):
            t0 = time.monotonic()
            view.train()
            lam = lam_schedule(epoch) if lam_schedule is not None else 0.0
            # one partner per target image for this epoch: uniform over its first K_i neighbours
            pos = (torch.rand(n, generator=gen) * counts.float()).long().clamp(max=kmax - 1)
            partner = nb_idx[torch.arange(n), pos] if n else torch.zeros(0, dtype=torch.long)
            used_pool.update(partner.tolist())
            tot_t = tot_s = 0.0
            count = steps = projected = 0
            if cached:  # the prefix activations of this epoch's partners that are not cached yet
                t1 = time.monotonic()
                store.ensure(extractor, [pool.samples[int(j)] for j in torch.unique(partner)], cut)
                pool_seconds += time.monotonic() - t1
                perm = torch.randperm(n, generator=order_gen)
                batches = []
                for b0 in range(0, n, cfg.batch_size):
                    ti = perm[b0:b0 + cfg.batch_size]
                    pj = partner[ti]
                    xs = store.gather([os.fspath(pool.samples[int(j)].path) for j in pj])
                    batches.append((tr_x[ti], tr_y[ti], xs, pool_labels[pj]))
                iterator = iter(batches)
            else:
                pair_ds.partner = partner
                iterator = ((xt, yt, xs, ys) for xt, yt, xs, ys, _ in loader)
            for xt, yt, xs, ys in iterator:
                xt = xt.to(device, non_blocking=True).float()
                xs = xs.to(device, non_blocking=True).float()
                yt, ys = yt.to(device), ys.to(device)
                x = _suffix_input(torch.cat([xt, xs]), net, cut, cached)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                    feats, state = _forward(view, reg, x)
                    w = class_w[ys.cpu()].to(device) if class_w is not None else None
                    loss, loss_t, loss_s = joint_step_loss(feats, len(yt), yt, ys, net.head, source_head,
                                                           source_weight=joint.source_weight, sample_weights=w,
                                                           label_smoothing=cfg.label_smoothing)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite joint training loss at epoch {epoch}")
                projected += _backward_and_step(loss, reg, state, lam, cfg, params, opt, sched)
                steps += 1
                tot_t += loss_t.item() * len(yt)
                tot_s += loss_s.item() * len(ys)
                count += len(yt)
            m = _evaluate(target_view, val_x, val_y, num_classes, device, cfg.batch_size)
            metrics = EpochMetrics(epoch, tot_t / max(1, count), m["loss"], m["accuracy"], m["macro_f1"],
                                   time.monotonic() - t0, lam, projected / max(1, steps))
            history.append(metrics)
            rounds[-1].setdefault("source_loss", []).append(round(tot_s / max(1, count), 4))
            bar.advance()
            stopper.update(metrics, net)
            if on_epoch is not None:
                on_epoch(metrics)
            if stopper.should_stop(deadline):
                break
            # eq. 3 at the end of a round
            if round_idx + 1 < len(starts) and epoch + 1 == starts[round_idx + 1]:
                if cached:
                    probs = _probs_cached(net, tr_x, cut, device)
                    labels = tr_y
                else:
                    probs = _probs_images(net, train_samples, eval_transform(source.data_config), device, cfg.batch_size)
                    labels = torch.tensor([s.label for s in train_samples])
                cat = schedule.classify(probs, labels)
                rounds[-1].update({"wrong": int((cat == 2).sum()), "uncertain": int((cat == 1).sum())})
                counts = schedule.next_counts(probs, labels, counts, round_idx).clamp(max=kmax)
                counts_by_round.append(counts.clone())
                round_idx += 1
                start_round()
    net.load_state_dict(stopper.state)
    net.cpu().eval()
    if reg is not None and hasattr(reg, "close"):
        reg.close()
    seconds = time.monotonic() - start
    notes.update({
        "joint": True, "k0": joint.k0, "rounds_planned": len(starts), "rounds_run": len(rounds), "round_starts": starts,
        "k_searched": kmax, "delta": round(delta, 4), "rounds": rounds, "pool_images_used": len(used_pool), "source_weight": joint.source_weight,
        "source_head_init": head_init,
        "cached_prefix": cached, "pool_prefix_seconds": round(pool_seconds, 3),
        "pool_prefix_images": store.extracted - extracted0 if store is not None else 0, "train_seconds": round(seconds, 3),
    })
    if joint.csv_path is not None:
        write_retrieval_csv(joint.csv_path, train_samples, pool, knn, counts_by_round, joint.target_classes)
        notes["csv"] = str(joint.csv_path)
    return TrainResult(net, cfg, history, stopper.best_epoch, stopper.best, seconds, cached, len(train_samples))


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
                    w.writerow([os.fspath(t.path), tclass, r + 1, os.fspath(pool.samples[j].path),
                                pool.classes[pool.samples[j].label], "" if math.isnan(d) else f"{d:.6g}", joined])
    return path
