"""Training a TransferNet: AdamW (or SGD) + warm-up cosine, label smoothing, early stopping.

Two input paths:
- *cached*: the frozen prefix's activations come from ``FeatureExtractor`` (computed once);
  only the trainable suffix and head run per step, with a random horizontal flip of the cached
  maps as augmentation (a conv net's maps of a flipped image are close to flipped maps);
- *images*: timm's training augmentation on decoded images, the frozen prefix under no_grad.
Regularisers (L2-SP, feature-map KD, with or without DTNH) plug in through ``BaseRegularizer``.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from . import _console
from .data import Sample
from .features import ActivationSet, FeatureExtractor, ImageDataset, make_loader, train_transform
from .models import SourceModel
from .stages import TransferNet, resolve_frozen

OBJECTIVES = ("accuracy", "macro_f1")


@dataclass
class TrainConfig:
    """One transfer strategy's training settings (the search varies these)."""

    frozen_stages: int | str = "all"
    epochs: int = 15
    lr: float = 3e-3  # head learning rate; the pretrained stages get lr * backbone_lr_ratio
    backbone_lr_ratio: float = 0.1
    weight_decay: float = 1e-4
    batch_size: int = 64
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 5
    optimizer: str = "adamw"  # or "sgd" (momentum 0.9)
    objective: str = "accuracy"
    seed: int = 0
    use_cache: str | bool = "auto"  # True | False | "auto" (cache when it fits in memory)
    # regularisation (see autotl.regularizers)
    regularizer: str = "none"  # "none" | "l2sp" | "kd"
    reg_lambda: float = 0.0  # λ: weight of the regulariser
    reg_beta: float = 0.0  # L2-SP β on the new head
    reg_decay: float = 1.0  # λ_e = λ · decay^epoch
    kd_layers: list[str] = field(default_factory=list)
    dtnh: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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


class _SuffixView(nn.Module):
    """The part of a TransferNet a trial trains: from the activation at ``cut`` to the logits.
    Regularisers see this module (their hooks address ``net.stages.i``)."""

    def __init__(self, net: TransferNet, cut: int):
        super().__init__()
        self.net = net
        self.cut = cut

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net.forward_from(a, self.cut)


def _optimizer(net: TransferNet, cfg: TrainConfig) -> torch.optim.Optimizer:
    backbone = [p for _, p in net.shared_parameters()]
    head = [p for _, p in net.new_parameters()]
    # L2-SP replaces weight decay: decay towards zero would fight the pull towards w0.
    wd = 0.0 if cfg.regularizer == "l2sp" else cfg.weight_decay
    groups = [{"params": head, "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_ratio})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=wd, nesterov=True)
    if cfg.optimizer != "adamw":
        raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adamw or sgd)")
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=wd)


def _warmup_cosine(opt, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _make_regularizer(cfg: TrainConfig, view: _SuffixView):
    """The regulariser ``cfg.regularizer`` names, built by its registered class from ``cfg`` and bound
    to ``view``; None when it is off. Unknown names raise a ValueError listing the registered ones."""
    if cfg.regularizer == "none" or cfg.reg_lambda <= 0 and cfg.reg_beta <= 0:
        return None
    from .regularizers import regularizer_from_config

    net = view.net
    reg = regularizer_from_config(cfg, view)
    # No source model: a regulariser that needs one (feature-map KD) copies ``view`` at bind time.
    reg.bind(view, shared_params=[(f"net.{n}", p) for n, p in net.shared_parameters()],
             new_params=[(f"net.{n}", p) for n, p in net.new_parameters()])
    return reg


class _EarlyStopping:
    """Keeps the best epoch's weights (objective, ties → lower val loss) and counts bad epochs."""

    def __init__(self, objective: str, patience: int):
        self.objective, self.patience = objective, patience
        self.best: EpochMetrics | None = None
        self.best_epoch, self.bad_epochs, self.state = -1, 0, None

    def update(self, metrics: EpochMetrics, net: nn.Module) -> None:
        best, o = self.best, self.objective
        if best is None or metrics.score(o) > best.score(o) + 1e-9 or (
                metrics.score(o) >= best.score(o) - 1e-9 and metrics.val_loss < best.val_loss):
            self.best, self.best_epoch, self.bad_epochs = metrics, metrics.epoch, 0
            self.state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            self.bad_epochs += 1

    def should_stop(self, deadline: float | None) -> bool:
        return self.bad_epochs >= self.patience or (deadline is not None and time.monotonic() > deadline)


def _suffix_input(x: torch.Tensor, net: TransferNet, cut: int, cached: bool) -> torch.Tensor:
    """A batch as the trainable suffix takes it: cached maps get a random horizontal flip (our
    augmentation there), decoded images go through the frozen prefix; channels_last on CUDA."""
    if cached and x.ndim == 4:
        flip = torch.rand(x.shape[0], device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if not cached and cut > 0:
        with torch.no_grad():
            x = net.forward_prefix(x, cut)
    if x.is_cuda and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


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
    if extractor is None or use_cache is False:
        return False
    if use_cache is True or cut >= extractor.num_stages:
        return True
    return extractor.map_bytes(n_images, cut) <= extractor.max_cache_bytes


def train_model(
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
) -> TrainResult:
    """Train a new head (and the unfrozen stages) on ``train_samples``, early-stopped on val.

    ``on_epoch`` sees every epoch's metrics (the search reports them to its pruner and may raise
    ``optuna.TrialPruned`` from it). ``deadline`` (time.monotonic) stops training early.
    """
    cfg = config
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}")
    device = pick_device(device) if not isinstance(device, torch.device) else device
    set_seed(cfg.seed)
    start = time.monotonic()
    net = TransferNet.from_source(source.model, num_classes, cfg.frozen_stages, seed=cfg.seed)
    cut = net.frozen
    cached = should_cache(extractor, len(train_samples) + len(val_samples), cut, cfg.use_cache)
    if extractor is None:
        extractor = FeatureExtractor(source, device=device)
    val_acts = extractor.extract(val_samples, [cut], description="val features")
    val_x, val_y = val_acts.at(cut, net.num_stages), val_acts.labels
    if cached:
        tr = extractor.extract(train_samples, [cut], description="train features")
        train_loader = make_loader(TensorDataset(tr.at(cut, net.num_stages), tr.labels), batch_size=cfg.batch_size,
                                   shuffle=True, device=torch.device("cpu"), seed=cfg.seed)
        train_loader.num_workers = 0  # tensors already in memory
    else:
        train_loader = make_loader(ImageDataset(train_samples, train_transform(source.data_config)),
                                   batch_size=cfg.batch_size, shuffle=True, device=device, seed=cfg.seed)

    use_cuda = device.type == "cuda"
    net.to(device)
    if use_cuda:
        net.to(memory_format=torch.channels_last)
    view = _SuffixView(net, cut)
    reg = _make_regularizer(cfg, view)
    if reg is not None and getattr(reg, "source_model", None) is not None:
        reg.source_model.to(device)
    params = [p for p in view.parameters() if p.requires_grad]
    opt = _optimizer(net, cfg)
    steps_per_epoch = max(1, len(train_loader))
    sched = _warmup_cosine(opt, cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    lam_schedule = None
    if reg is not None:
        from .regularizers import CoefficientSchedule

        lam_schedule = CoefficientSchedule(cfg.reg_lambda if cfg.regularizer != "l2sp" or cfg.reg_lambda > 0 else 1.0, cfg.reg_decay)

    set_seed(cfg.seed)  # a cache miss above consumed random numbers (loader seeds); a hit did not
    history: list[EpochMetrics] = []
    stopper = _EarlyStopping(cfg.objective, cfg.patience)
    with _console.progress("training", total=cfg.epochs) as bar:
        for epoch in range(cfg.epochs):
            t0 = time.monotonic()
            view.train()
            lam = lam_schedule(epoch) if lam_schedule is not None else 0.0
            total, count, projected, steps = 0.0, 0, 0, 0
            for batch in train_loader:
                x, y = batch[0], batch[1]
                x = x.to(device, non_blocking=True).float()
                y = y.to(device, non_blocking=True)
                x = _suffix_input(x, net, cut, cached)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
                    logits, state = _forward(view, reg, x)
                    loss = criterion(logits.float(), y)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
                projected += _backward_and_step(loss, reg, state, lam, cfg, params, opt, sched)
                steps += 1
                total += loss.item() * len(y)
                count += len(y)
            m = _evaluate(view, val_x, val_y, num_classes, device, cfg.batch_size)
            metrics = EpochMetrics(epoch, total / max(1, count), m["loss"], m["accuracy"], m["macro_f1"],
                                   time.monotonic() - t0, lam, projected / max(1, steps))
            history.append(metrics)
            bar.advance()
            stopper.update(metrics, net)
            if on_epoch is not None:
                on_epoch(metrics)
            if stopper.should_stop(deadline):
                break
    net.load_state_dict(stopper.state)
    net.cpu().eval()
    if use_cuda:
        net.to(memory_format=torch.contiguous_format)
    return TrainResult(net, cfg, history, stopper.best_epoch, stopper.best, time.monotonic() - start, cached, len(train_samples))


@torch.no_grad()
def _evaluate(view: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, device, batch_size: int) -> dict:
    view.eval()
    out = []
    use_cuda = device.type == "cuda"
    for i in range(0, len(x), max(batch_size, 256)):
        xb = x[i : i + max(batch_size, 256)].to(device).float()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_cuda):
            out.append(view(xb).float().cpu())
    logits = torch.cat(out) if out else torch.zeros(0, num_classes)
    return classification_metrics(logits, y, num_classes)


@torch.no_grad()
def predict_logits(net: TransferNet, acts: ActivationSet, batch_size: int = 256) -> torch.Tensor:
    """Logits of a trained net on cached activations at its own cut."""
    net.eval()
    x = acts.at(net.frozen, net.num_stages)
    return torch.cat([net.forward_from(x[i : i + batch_size].float(), net.frozen) for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0, net.head.out_features)


__all__ = ["TrainConfig", "TrainResult", "EpochMetrics", "train_model", "predict_logits", "classification_metrics",
           "confusion_matrix", "pick_device", "resolve_frozen", "set_seed"]
