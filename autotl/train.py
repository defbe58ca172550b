"""Training a TransferNet: AdamW (or SGD) + warm-up cosine, label smoothing, early stopping.

Two input paths:
- *cached*: the frozen prefix's activations come from ``FeatureExtractor`` (computed once);
  only the trainable suffix and head run per step, with a random horizontal flip of the cached
  maps as augmentation (a conv net's maps of a flipped image are close to flipped maps);
- *images*: timm's training augmentation on decoded images, the frozen prefix under no_grad.
Regularisers (L2-SP, feature-map KD, with or without DTNH) plug in through ``BaseRegularizer``;
their forward hooks are removed when ``train_model`` returns or raises.

Hooks. A trainer that needs more than this loop (selective joint fine-tuning: source-pool images in
every batch, a source-head loss, hard-sample rounds) passes ``train_model(..., hooks=h)`` with ``h``
a ``TrainingHooks`` subclass instance (one per run: it holds the run's state) instead of copying
the set-up and the epoch loop. ``train_model`` calls, in this order:

- ``h.extra_cache_images`` (attribute, default 0): images beyond train + val whose prefix
  activations the hooks will hold, counted in the cache-or-decode decision;
- ``h.setup(run: TrainingSetup) -> nn.Module | None`` (abstract): once, after the net, its training
  inputs and the device are set. The module returned (e.g. a second head) is trained beside the
  net: moved to the device, part of the module the regulariser binds to, optimised at the head's
  learning rate;
- ``h.extra_dataset() -> Dataset | None``: item i is an extra example ``(input, label)`` that rides
  with training sample i (an activation at the cut on the cached path, an image tensor otherwise),
  read when the batch is loaded so it may change between epochs. Its rows are appended to each batch
  and go through the trainable stages in the same forward pass as the training rows;
- per epoch ``h.start_epoch(epoch)`` before the first batch, per step
  ``h.extra_loss(features, labels) -> Tensor`` on the pooled features of the extra rows (added to the
  target cross-entropy before the backward pass), ``h.end_epoch(metrics)`` after validation (before
  ``on_epoch`` and the stop test);
- per round: ``h.round_starts`` (attribute, default ``(0,)``) splits the epochs into rounds;
  ``h.end_round(round_idx)`` runs after the last epoch of every round but the final one, unless
  training stopped in that epoch. Each round is a fine-tuning of its own (Ge & Yu's iterations):
  it continues from the previous round's weights and optimiser state with its own learning-rate
  schedule (round 0: warm-up, then cosine to 0 over the round; every later round restarts at the
  full rate, so what ``end_round`` changed trains at full rate, and decays by cosine over its own
  epochs). With more than one round there is no early stopping (none could reach back into an
  earlier round): every epoch runs unless the deadline passes, and the net returned is the last
  round's, at its last epoch.
``h.progress_label`` names the progress bar. Gradient transforms are not hooks: they stay with the
regulariser path (DTNH projection in ``regularized_backward``).
"""
from __future__ import annotations

import abc
import bisect
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from . import _console
from .data import Sample
from .device import DevicePolicy, as_policy, pick_device
from .features import ActivationSet, FeatureExtractor, ImageDataset, make_loader, train_transform
from .models import SourceModel
from .stages import SuffixView, TransferNet, resolve_frozen
from .train_config import OBJECTIVES, TrainConfig


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    accuracy: float
    macro_f1: float
    seconds: float
    lam: float = 0.0
    projected_fraction: float = 0.0  # DTNH: share of steps whose regulariser gradient was projected

    def score(self, objective: str) -> float:
        return getattr(self, objective)


@dataclass
class TrainResult:
    net: TransferNet
    config: TrainConfig
    history: list[EpochMetrics]
    best_epoch: int
    best: EpochMetrics
    seconds: float
    cached: bool
    n_train: int


@dataclass(frozen=True)
class TrainingSetup:
    """What ``train_model`` has built when it calls ``TrainingHooks.setup``."""

    net: TransferNet  # on ``device``
    cut: int  # index of the first trainable stage: batches enter the net here
    cached: bool  # batches are prefix activations at ``cut`` (else decoded images)
    device: torch.device
    extractor: FeatureExtractor
    train_inputs: torch.Tensor | None  # (n, ...) activations at ``cut`` of the training samples; None unless cached
    train_labels: torch.Tensor  # (n,) int64
    policy: DevicePolicy | None = None  # how the loop uses ``device`` (autocast, memory format); None: its default


class TrainingHooks(abc.ABC):
    """Additions to ``train_model``'s loop: extra rows and loss terms per step, per-epoch and
    per-round callbacks (module docstring). One instance per training run."""

    progress_label: str = "training"
    extra_cache_images: int = 0
    round_starts: Sequence[int] = (0,)

    @abc.abstractmethod
    def setup(self, run: TrainingSetup) -> nn.Module | None:
        """Once, before the first epoch; returns a module to train beside the net, or None."""

    def extra_dataset(self) -> Dataset | None:
        """Item i: ``(input, label)`` of the extra example riding with training sample i; None: none."""
        return None

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The step's extra loss term from the pooled ``features`` of its extra rows."""
        raise NotImplementedError(f"{type(self).__name__} gives extra rows (extra_dataset) but no extra_loss")

    def start_epoch(self, epoch: int) -> None:
        """Before the epoch's first batch."""

    def end_epoch(self, metrics: EpochMetrics) -> None:
        """After the epoch's validation, before ``on_epoch`` and the stop test."""

    def end_round(self, round_idx: int) -> None:
        """After the last epoch of round ``round_idx`` when another round follows."""

    def end_training(self, net: TransferNet, evaluate: Callable[[TransferNet], dict[str, float]]) -> None:
        """Once the kept epoch's weights are back in ``net``: may change ``net`` in place (e.g. weight
        interpolation); ``evaluate(net)`` gives its metrics on the run's validation images."""

    def finish(self, result: "TrainResult") -> None:
        """After training, with what it returns (e.g. to report what the hooks did)."""


class _AllHooks(TrainingHooks):
    """Several strategies' hooks in one loop, in the strategies' order. Per-epoch and end-of-training
    calls go to each; at most one may add extra rows (and their loss) or split training into rounds;
    the modules they train beside the net are trained together."""

    def __init__(self, hooks: Sequence[TrainingHooks]):
        self.hooks = list(hooks)
        extra = [h for h in self.hooks if type(h).extra_dataset is not TrainingHooks.extra_dataset]
        rounds = [h for h in self.hooks if tuple(h.round_starts) != (0,)]
        if len(extra) > 1 or len(rounds) > 1:
            names = ", ".join(type(h).__name__ for h in (extra if len(extra) > 1 else rounds))
            raise ValueError(f"hooks {names} each add extra rows or rounds; one training run takes one of them")
        self.extra = extra[0] if extra else None
        self.round_starts = rounds[0].round_starts if rounds else (0,)
        self.extra_cache_images = sum(h.extra_cache_images for h in self.hooks)
        labels = [h.progress_label for h in self.hooks if h.progress_label != TrainingHooks.progress_label]
        self.progress_label = labels[0] if labels else TrainingHooks.progress_label

    def setup(self, run: TrainingSetup) -> nn.Module | None:
        modules = [m for m in (h.setup(run) for h in self.hooks) if m is not None]
        return None if not modules else modules[0] if len(modules) == 1 else nn.ModuleList(modules)

    def extra_dataset(self) -> Dataset | None:
        return self.extra.extra_dataset() if self.extra is not None else None

    def extra_loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.extra.extra_loss(features, labels)

    def start_epoch(self, epoch: int) -> None:
        for h in self.hooks:
            h.start_epoch(epoch)

    def end_epoch(self, metrics: EpochMetrics) -> None:
        for h in self.hooks:
            h.end_epoch(metrics)

    def end_round(self, round_idx: int) -> None:
        for h in self.hooks:
            h.end_round(round_idx)

    def end_training(self, net: TransferNet, evaluate) -> None:
        for h in self.hooks:
            h.end_training(net, evaluate)

    def finish(self, result: "TrainResult") -> None:
        for h in self.hooks:
            h.finish(result)


class _WithExtra(Dataset):
    """Training sample i followed by the hooks' extra example i: ``(x, y, x_extra, y_extra)``."""

    def __init__(self, base: Dataset, extra: Dataset):
        if len(extra) != len(base):
            raise ValueError(f"extra_dataset has {len(extra)} items for {len(base)} training samples")
        self.base, self.extra = base, extra

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        return (item[0], item[1], *self.extra[i])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    pred = logits.argmax(1)
    acc = (pred == labels).float().mean().item() if len(labels) else 0.0
    conf = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes).double()
    tp = conf.diag()
    precision = tp / conf.sum(0).clamp_min(1)
    recall = tp / conf.sum(1).clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    present = conf.sum(1) > 0
    macro_f1 = f1[present].mean().item() if present.any() else 0.0
    loss = nn.functional.cross_entropy(logits.float(), labels).item() if len(labels) else 0.0
    return {"accuracy": acc, "macro_f1": macro_f1, "loss": loss}


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> list[list[int]]:
    pred = logits.argmax(1)
    conf = torch.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)
    return conf.tolist()


def _optimizer(net: TransferNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    from .regularizers import turns_off_weight_decay

    backbone = [p for _, p in net.shared_parameters()]
    head = [p for _, p in net.new_parameters()]
    wd = 0.0 if turns_off_weight_decay(cfg) else cfg.weight_decay
    groups = [{"params": head, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_ratio})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=wd, nesterov=True)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd)


def round_lr_factor(step: int, total_steps: int, warmup_steps: int, round_start_steps: Sequence[int] = (0,)) -> float:
    """The learning-rate multiplier at optimiser step ``step``: warm-up then cosine to 0, restarted
    at every round start (``round_start_steps``, the first is 0). Only round 0 warms up: a later
    round continues a trained net and starts at the full rate. One round = plain warm-up cosine."""
    starts = sorted({0, *(int(s) for s in round_start_steps if 0 <= int(s) < total_steps)})
    r = bisect.bisect_right(starts, step) - 1
    begin, end = starts[r], (starts[r + 1] if r + 1 < len(starts) else total_steps)
    local, warm = step - begin, warmup_steps if r == 0 else 0
    if local < warm:
        return (local + 1) / max(1, warm)
    t = (local - warm) / max(1, end - begin - warm)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _warmup_cosine(opt, total_steps: int, warmup_steps: int, round_start_steps: Sequence[int] = (0,)):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: round_lr_factor(step, total_steps, warmup_steps, round_start_steps))


def _make_regularizer(cfg: TrainConfig, view: SuffixView):
    """The regulariser ``cfg.regularizer`` names, built by its registered class from ``cfg`` and bound
    to ``view``; None when it is off. Unknown names raise a ValueError listing the registered ones."""
    if cfg.regularizer == "none" or cfg.reg_lambda <= 0 and cfg.reg_beta <= 0:
        return None
    from .regularizers import regularizer_from_config

    net = view.net
    reg = regularizer_from_config(cfg, view)
    if reg is None:  # its coefficients switch it off (e.g. KD with reg_lambda 0)
        return None
    # No source model: a regulariser that needs one (feature-map KD) copies ``view`` at bind time.
    reg.bind(view, shared_params=[(f"net.{n}", p) for n, p in net.shared_parameters()],
             new_params=[(f"net.{n}", p) for n, p in net.new_parameters()])
    return reg


def changeable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``net.state_dict()`` that training can change: a TransferNet's trainable stages,
    its pool when not frozen, and its head (frozen stages and their BN statistics never change, so
    a probe's best epoch is a copy of the head, not of the backbone)."""
    state = net.state_dict()
    if not isinstance(net, TransferNet):
        return state
    keep = tuple(f"stages.{i}." for i in range(net.frozen, net.num_stages)) + ("head.",)
    keep += () if net.pool_frozen else ("pool.",)
    return {k: v for k, v in state.items() if k.startswith(keep)}


class _EarlyStopping:
    """Keeps the best epoch's weights (objective, ties → lower val loss) and counts bad epochs."""

    def __init__(self, objective: str, patience: int, enabled: bool = True):
        self.objective, self.patience, self.enabled = objective, patience, enabled
        self.best: EpochMetrics | None = None
        self.best_epoch, self.bad_epochs, self.state = -1, 0, None

    def update(self, metrics: EpochMetrics, net: nn.Module) -> None:
        best, o = self.best, self.objective
        # disabled: every epoch is "best", so the last one is kept and the val split decides nothing
        if not self.enabled or best is None or metrics.score(o) > best.score(o) + 1e-9 or (
                metrics.score(o) >= best.score(o) - 1e-9 and metrics.val_loss < best.val_loss):
            self.best, self.best_epoch, self.bad_epochs = metrics, metrics.epoch, 0
            self.state = {k: v.detach().clone() for k, v in changeable_state(net).items()}
        else:
            self.bad_epochs += 1

    def should_stop(self, deadline: float | None) -> bool:
        return self.bad_epochs >= self.patience or (deadline is not None and time.monotonic() > deadline)


def _suffix_input(x: torch.Tensor, net: TransferNet, cut: int, cached: bool, policy: DevicePolicy) -> torch.Tensor:
    """A batch as the trainable suffix takes it: cached maps get a random horizontal flip (our
    augmentation there), decoded images go through the frozen prefix (under the policy's autocast);
    in the policy's memory format."""
    if cached and x.ndim == 4:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = policy.format_input(x)
    if not cached and cut > 0:
        with torch.no_grad(), policy.autocast():
            x = policy.format_input(net.forward_prefix(x, cut))
    return x


@dataclass(frozen=True)
class MixedBatch:
    """How ``mixup`` mixed a batch's first rows: row i became ``lam·x_i + (1-lam)·x_perm[i]``."""

    lam: float = 1.0
    perm: torch.Tensor | None = None

    def loss(self, criterion, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mixup loss: the same mixture of the two labels' cross-entropies (plain CE when unmixed)."""
        if self.perm is None:
            return criterion(logits, y)
        return self.lam * criterion(logits, y) + (1.0 - self.lam) * criterion(logits, y[self.perm])


def mixup(x: torch.Tensor, n: int, alpha: float) -> tuple[torch.Tensor, MixedBatch]:
    """Mixup (Zhang et al. 2018) of the first ``n`` rows of ``x`` (the target rows; extra rows that
    ride with them stay as they are) at the input of the trainable part: decoded images for a full
    fine-tune, cached maps or pooled features otherwise (manifold mixup). ``alpha`` <= 0: no mixing."""
    if alpha <= 0 or n < 2:
        return x, MixedBatch()
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(n, device=x.device)
    mixed = lam * x[:n] + (1.0 - lam) * x[:n][perm]
    return (torch.cat([mixed, x[n:]]) if len(x) > n else mixed), MixedBatch(lam, perm)


def _forward(view: nn.Module, reg, x: torch.Tensor):
    """(output, regulariser state): a regulariser may need to see the forward pass (KD hooks)."""
    return (view(x), None) if reg is None else reg.forward(view, x)


def _backward_and_step(loss: torch.Tensor, reg, state, lam: float, cfg: TrainConfig, params, opt, sched) -> bool:
    """One optimiser step on ``loss`` (+ the regulariser, DTNH-projected when asked); True when
    DTNH projected the regulariser's gradient."""
    opt.zero_grad(set_to_none=True)
    projected = False
    if reg is None:
        loss.backward()
    else:
        from .regularizers import regularized_backward

        projected = bool(getattr(regularized_backward(loss, reg, state, lam, dtnh=cfg.dtnh, params=params), "projected", False))
    opt.step()
    sched.step()
    return projected


def should_cache(extractor: FeatureExtractor | None, n_images: int, cut: int, use_cache: str | bool) -> bool:
    """Whether training at ``cut`` reads the frozen prefix's activations from the cache (one pass) instead
    of running the prefix on decoded images every step. ``"auto"``: when they fit ``max_cache_bytes``,
    and never at cut 0, where the prefix is empty: that cache would be a float copy of the input
    image for each candidate (4× the run's decoded pixels), and it would train a full fine-tune
    without its augmentation."""
    if extractor is None or use_cache is False:
        return False
    if use_cache is True or cut >= extractor.num_stages:
        return True
    return cut > 0 and extractor.map_bytes(n_images, cut) <= extractor.max_cache_bytes


def train_model(
    source: SourceModel,
    train_samples: Sequence[Sample],
    val_samples: Sequence[Sample],
    num_classes: int,
    config: TrainConfig,
    *,
    extractor: FeatureExtractor | None = None,
    device: torch.device | str | DevicePolicy | None = None,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
    deadline: float | None = None,
    hooks: TrainingHooks | Sequence[TrainingHooks] | None = None,
) -> TrainResult:
    """Train a new head (and the unfrozen stages) on ``train_samples``, early-stopped on val.

    ``device``: a ``DevicePolicy``, or a device (None: auto) run as the extractor's policy says
    when the extractor is on it (the run's policy travels with its extractors), else by its default.
    ``on_epoch`` sees every epoch's metrics (the search reports them to its pruner and may raise
    ``optuna.TrialPruned`` from it). ``deadline`` (time.monotonic) stops training early. ``hooks``
    add extra rows, loss terms and epoch/round callbacks (module docstring).
    """
    cfg = config
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    policy = as_policy(device, getattr(extractor, "policy", None))
    device = policy.device
    hooks = _AllHooks([] if hooks is None else [hooks] if isinstance(hooks, TrainingHooks) else list(hooks))
    set_seed(cfg.seed)
    start = time.monotonic()
    net = TransferNet.from_source(source.model, num_classes, cfg.frozen_stages, seed=cfg.seed)
    cut = net.frozen
    n_images = len(train_samples) + len(val_samples) + hooks.extra_cache_images
    # RandAugment works on decoded images: the training rows cannot come from the prefix cache then
    cached = should_cache(extractor, n_images, cut, cfg.use_cache) and cfg.rand_augment <= 0
    if extractor is None:
        extractor = FeatureExtractor(source, device=policy)
    val_acts = extractor.extract(val_samples, [cut], description="val features")
    val_x, val_y = val_acts.at(cut, net.num_stages), val_acts.labels
    if cached:
        tr = extractor.extract(train_samples, [cut], description="train features")
        train_inputs, train_labels = tr.at(cut, net.num_stages), tr.labels
        train_set: Dataset = TensorDataset(train_inputs, train_labels)
    else:
        train_inputs, train_labels = None, torch.tensor([s.label for s in train_samples], dtype=torch.long)
        train_set = ImageDataset(train_samples, train_transform(source.data_config, rand_augment=cfg.rand_augment))

    policy.module(net)
    extra_module = hooks.setup(TrainingSetup(net, cut, cached, device, extractor, train_inputs, train_labels, policy))
    if extra_module is not None:
        policy.module(extra_module)
    extra_set = hooks.extra_dataset()
    if extra_set is not None:
        train_set = _WithExtra(train_set, extra_set)
    # cached tensors are already in memory: no workers; decoded images: workers kept across epochs
    # unless the hooks' extra rows change between epochs (a worker would keep its stale copy)
    train_loader = make_loader(train_set, batch_size=cfg.batch_size, shuffle=True, device=policy, seed=cfg.seed,
                               workers=0 if cached else None, persistent=extra_set is None)
    view = SuffixView(net, cut, extra_module)
    reg = _make_regularizer(cfg, view)
    try:
        if reg is not None and getattr(reg, "source_model", None) is not None:
            reg.source_model.to(device)
        params = [p for p in view.parameters() if p.requires_grad]
        opt = _optimizer(net, cfg)
        if extra_module is not None:  # a new layer like the head: the head's learning rate
            opt.add_param_group({"params": list(extra_module.parameters()), "lr": cfg.lr})
        steps_per_epoch = max(1, len(train_loader))
        round_starts = sorted({0, *(int(e) for e in hooks.round_starts if 0 <= int(e) < cfg.epochs)})
        sched = _warmup_cosine(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch),
                               [e * steps_per_epoch for e in round_starts])
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        lam_schedule = None
        if reg is not None:
            from .regularizers import CoefficientSchedule

            lam_schedule = CoefficientSchedule(type(reg).coefficient(cfg), cfg.reg_decay)  # L2-SP: 1 (α, β inside Ω)

        set_seed(cfg.seed)  # a cache miss above consumed random numbers (loader seeds); a hit did not
        history: list[EpochMetrics] = []
        # rounds: no early stopping, it would restore (or stop in) a round the later ones build on
        stopper = _EarlyStopping(cfg.objective, cfg.patience, cfg.early_stopping and len(round_starts) == 1)
        round_idx = 0
        with _console.progress(hooks.progress_label, total=cfg.epochs) as bar:
            for epoch in range(cfg.epochs):
                t0 = time.monotonic()
                view.train()
                lam = lam_schedule(epoch) if lam_schedule is not None else 0.0
                hooks.start_epoch(epoch)
                total, count, projected, steps = 0.0, 0, 0, 0
                for batch in train_loader:
                    x = batch[0].to(device, non_blocking=True).float()
                    y = batch[1].to(device, non_blocking=True)
                    n = len(y)
                    if extra_set is not None:  # one forward pass for both: shared batch-norm statistics
                        x = torch.cat([x, batch[2].to(device, non_blocking=True).float()])
                        y_extra = batch[3].to(device, non_blocking=True)
                    x = _suffix_input(x, net, cut, cached, policy)
                    x, mix = mixup(x, n, cfg.mixup_alpha)
                    with policy.autocast():
                        features, state = _forward(view, reg, x)
                        target_loss = mix.loss(criterion, net.head(features[:n]).float(), y)
                        loss = target_loss if extra_set is None else target_loss + hooks.extra_loss(features[n:], y_extra)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
                    projected += _backward_and_step(loss, reg, state, lam, cfg, params, opt, sched)
                    steps += 1
                    total += target_loss.item() * n
                    count += n
                m = _evaluate(net, cut, val_x, val_y, num_classes, policy, cfg.batch_size)
                metrics = EpochMetrics(epoch, total / max(1, count), m["loss"], m["accuracy"], m["macro_f1"],
                                       time.monotonic() - t0, lam, projected / max(1, steps))
                history.append(metrics)
                bar.advance()
                stopper.update(metrics, net)
                hooks.end_epoch(metrics)
                if on_epoch is not None:
                    on_epoch(metrics)
                if stopper.should_stop(deadline) or (cfg.stop_epoch is not None and epoch + 1 >= cfg.stop_epoch):
                    break
                if round_idx + 1 < len(round_starts) and epoch + 1 == round_starts[round_idx + 1]:
                    hooks.end_round(round_idx)
                    round_idx += 1
        unexpected = net.load_state_dict(stopper.state, strict=False).unexpected_keys
        if unexpected:  # changeable_state names only keys of this net
            raise RuntimeError(f"best-epoch state has keys the net lacks: {unexpected[:3]}")
        hooks.end_training(net, lambda n: _evaluate(n, cut, val_x, val_y, num_classes, policy, cfg.batch_size))
    finally:
        if reg is not None:  # KD's forward hooks sit on the net's stages: never hand them back
            reg.close()
        # persistent decoder workers end now, not whenever the traceback of a pruned trial is freed
        train_loader = None  # noqa: F841
    policy.release(net).eval()
    result = TrainResult(net, cfg, history, stopper.best_epoch, stopper.best, time.monotonic() - start, cached,
                         len(train_samples))
    hooks.finish(result)
    return result


@torch.no_grad()
def _batched_logits(net: TransferNet, cut: int, x: torch.Tensor, batch_size: int, num_classes: int,
                    policy: DevicePolicy | None = None) -> torch.Tensor:
    """``net``'s logits (float, on the CPU) on activations ``x`` at stage ``cut``, ``batch_size`` rows at
    a time: on ``policy``'s device, input layout and autocast when given, else where the net is."""
    net.eval()
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        if policy is None:
            out.append(net.forward_from(xb.float(), cut).float().cpu())
            continue
        xb = policy.format_input(xb.to(policy.device).float())
        with policy.autocast():
            out.append(net.forward_from(xb, cut).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def _evaluate(net: TransferNet, cut: int, x: torch.Tensor, y: torch.Tensor, num_classes: int, policy: DevicePolicy,
              batch_size: int) -> dict:
    logits = _batched_logits(net, cut, x, max(batch_size, 256), num_classes, policy)
    return classification_metrics(logits, y, num_classes)


def predict_logits(net: TransferNet, acts: ActivationSet, batch_size: int = 256) -> torch.Tensor:
    """Logits of a trained net on cached activations at its own cut."""
    return _batched_logits(net, net.frozen, acts.at(net.frozen, net.num_stages), batch_size, net.head.out_features)


__all__ = ["TrainConfig", "TrainResult", "EpochMetrics", "TrainingHooks", "TrainingSetup", "train_model", "round_lr_factor",
           "predict_logits", "mixup", "MixedBatch", "classification_metrics", "confusion_matrix", "pick_device", "resolve_frozen", "set_seed"]
