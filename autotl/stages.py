"""A timm backbone as an ordered list of stages, split into a frozen prefix and a trainable suffix.

``TransferNet`` runs ``stages[0..N)`` then a parameter-free ``pool`` then a new ``head``. Freezing
the first ``n`` stages makes ``stages[:n]`` constant, so their output (the activation at *cut* ``n``)
can be computed once and cached; a trial then trains only ``stages[n:]`` and the head. Cut ``N``
(all stages frozen) is the pooled feature vector: a linear probe.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
from torch import nn

ALL = "all"


class _ForwardFeatures(nn.Module):
    """Fallback single stage for architectures we cannot split: ``model.forward_features``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


class _PreLogits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(x, pre_logits=True)


def _named_stages(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """Stages in forward order and the pooling module, for the families timm builds that way."""
    kids = dict(model.named_children())
    if {"conv_stem", "bn1", "blocks"} <= kids.keys():  # EfficientNet / MobileNet family
        stages = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
        stages += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
        if "bn2" in kids:  # EfficientNet: conv_head + bn2 before pooling
            stages.append(("head", nn.Sequential(model.conv_head, model.bn2)))
            return stages, model.global_pool
        if "norm_head" in kids:  # MobileNetV3: pooling precedes conv_head
            stages.append(("head", nn.Sequential(model.global_pool, model.conv_head, model.norm_head, model.act2, model.flatten)))
            return stages, nn.Identity()
    if {"conv1", "bn1", "act1", "maxpool", "layer1"} <= kids.keys():  # ResNet family
        stages = [("stem", nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool))]
        stages += [(f"layer{i}", getattr(model, f"layer{i}")) for i in range(1, 5) if hasattr(model, f"layer{i}")]
        return stages, model.global_pool
    raise NotImplementedError


def staged_backbone(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], nn.Module]:
    """Split ``model`` into stages whose composition equals its pre-logit features.

    The split is verified numerically against ``forward_head(forward_features(x), pre_logits=True)``;
    an architecture we cannot split exactly becomes one stage (freeze all or nothing).
    """
    was_training = model.training
    model.eval()
    try:
        stages, pool = _named_stages(model)
        size = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 64, 64))[-1]
        x = torch.randn(2, 3, min(int(size), 96), min(int(size), 96))
        with torch.no_grad():
            want = model.forward_head(model.forward_features(x), pre_logits=True)
            got = x
            for _, stage in stages:
                got = stage(got)
            got = pool(got)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise NotImplementedError
    except NotImplementedError:
        stages, pool = [("features", _ForwardFeatures(model))], _PreLogits(model)
    finally:
        model.train(was_training)
    return stages, pool


def resolve_frozen(frozen: int | str | None, n_stages: int) -> int:
    """``"all"``/None → every stage; negative counts from the end (-1 = all but the last)."""
    if frozen is None or frozen == ALL:
        return n_stages
    n = int(frozen)
    if n < 0:
        n = n_stages + n
    if not 0 <= n <= n_stages:
        raise ValueError(f"frozen stages must be in [0, {n_stages}] or 'all', got {frozen}")
    return n


class TransferNet(nn.Module):
    """stages → pool → head, with the first ``frozen`` stages frozen (no grad, BN in eval)."""

    def __init__(self, stages: list[tuple[str, nn.Module]], pool: nn.Module, head: nn.Module, frozen: int = 0):
        super().__init__()
        self.stage_names = [n for n, _ in stages]
        self.stages = nn.ModuleList([m for _, m in stages])
        self.pool = pool
        self.head = head
        self.frozen = 0
        self.freeze(frozen)

    @classmethod
    def from_source(cls, source_model: nn.Module, num_classes: int, frozen: int | str | None = 0, *, seed: int = 0) -> "TransferNet":
        """A copy of the source backbone with a new head; the source model is left untouched."""
        stages, pool = staged_backbone(copy.deepcopy(source_model))
        with torch.no_grad():
            dim = _pooled_dim(stages, pool, source_model)
        gen = torch.Generator().manual_seed(seed)
        head = nn.Linear(dim, num_classes)
        with torch.no_grad():  # seeded init, independent of the global RNG
            bound = 1.0 / dim**0.5
            head.weight.uniform_(-bound, bound, generator=gen)
            head.bias.zero_()
        return cls(stages, pool, head, resolve_frozen(frozen, len(stages)))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def freeze(self, n: int | str | None) -> None:
        self.frozen = resolve_frozen(n, self.num_stages)
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= self.frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.stages[: self.frozen]:  # frozen BN statistics never drift
            stage.eval()
        return self

    # forward pieces -------------------------------------------------------------------------
    def forward_prefix(self, x: torch.Tensor, cut: int) -> torch.Tensor:
        """Activation at ``cut``: output of stages[:cut]; pooled features when cut == num_stages."""
        for stage in self.stages[:cut]:
            x = stage(x)
        return self.pool(x) if cut == self.num_stages else x

    def forward_features_from(self, a: torch.Tensor, cut: int) -> torch.Tensor:
        if cut < self.num_stages:
            for stage in self.stages[cut:]:
                a = stage(a)
            a = self.pool(a)
        return a

    def forward_from(self, a: torch.Tensor, cut: int) -> torch.Tensor:
        return self.head(self.forward_features_from(a, cut))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from(x, 0)

    # parameter groups -------------------------------------------------------------------------
    def shared_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Trainable pretrained parameters (the ones L2-SP pulls towards their start)."""
        return [(f"stages.{n}", p) for n, p in self.stages.named_parameters() if p.requires_grad]

    def new_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"head.{n}", p) for n, p in self.head.named_parameters()]

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [*self.stages[self.frozen :], self.head]

    def stage_module_name(self, stage_name: str) -> str:
        """Module path inside this net of a stage given by its backbone name (e.g. 'blocks.5')."""
        return f"stages.{self.stage_names.index(stage_name)}"


def _pooled_dim(stages, pool, model) -> int:
    dim = getattr(model, "num_features", None)
    if dim:
        # MobileNetV3's head_hidden_size is what pre-logits emit
        return int(getattr(model, "head_hidden_size", None) or dim)
    x = torch.randn(1, 3, 64, 64)
    for _, s in stages:
        x = s(x)
    return int(pool(x).shape[-1])
