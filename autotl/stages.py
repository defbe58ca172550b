"""A timm backbone as an ordered list of stages, split into a frozen prefix and a trainable suffix.

``TransferNet`` runs ``stages[0..N)`` then ``pool`` (the model's own pre-logits head: pooling,
and any norm after it) then a new ``head``. Freezing the first ``n`` stages makes ``stages[:n]``
constant, so their output (the activation at *cut* ``n``) can be computed once and cached; a
trial then trains only ``stages[n:]`` and the head. Cut ``N`` (all stages frozen) is the pooled
feature vector: a linear probe.

Where the stages come from: the EfficientNet / MobileNet family keeps its historical split
(stem, every ``blocks.i``, the conv head), which cache keys and recipes count on. Every other
timm model is split along timm's own layer grouping, ``model.group_matcher(coarse=True)`` (the
stem / block groups of layer-wise LR decay), at the points where its ``forward_features`` hands a
tensor straight from one module to the next. Every split is verified numerically; a model that
cannot be split exactly is one stage (freeze all or nothing).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

ALL = "all"
# A source model carrying this submodule takes a run's shared preprocessed input: the adapter turns
# it into the model's own (see ``SourceModel.share_input``); it runs first in the first stage.
INPUT_ADAPTER = "autotl_input_adapter"

Stages = list[tuple[str, nn.Module]]


class _ForwardFeatures(nn.Module):
    """``model.forward_features``: the whole backbone as one stage, or (on a partial copy of the
    model, see ``_partial_copy``) the stem, whose glue code lives in ``forward_features``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


class _PreLogits(nn.Module):
    """``model.forward_head(x, pre_logits=True)``: the model's pooling and pre-logits layers."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_head(x, pre_logits=True)


class InputAdapter(nn.Module):
    """An image preprocessed one way → as another model expects it: un-normalise, resize, normalise."""

    def __init__(self, given: dict, wanted: dict):
        super().__init__()
        self.size = tuple(int(v) for v in wanted["input_size"][1:])
        self.same_size = tuple(int(v) for v in given["input_size"][1:]) == self.size
        for name, cfg in (("p", given), ("m", wanted)):
            self.register_buffer(f"{name}_mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer(f"{name}_std", torch.tensor(cfg["std"], dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.p_std + self.p_mean
        if not self.same_size:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return (x - self.m_mean) / self.m_std


def same_preprocessing(a: dict, b: dict) -> bool:
    keys = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
    return all(tuple(np.atleast_1d(a.get(k))) == tuple(np.atleast_1d(b.get(k))) for k in keys)


def _efficientnet_family_stages(model: nn.Module) -> tuple[Stages, nn.Module] | None:
    """The historical split of EfficientNet / MobileNet. timm's grouping differs (it merges
    EfficientNet's conv head into the last block, MobileNetV3's conv head sits after pooling),
    and caches and recipes count these stages."""
    kids = dict(model.named_children())
    if not {"conv_stem", "bn1", "blocks"} <= kids.keys():
        return None
    stages = [("stem", nn.Sequential(model.conv_stem, model.bn1))]
    stages += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    if "bn2" in kids:  # EfficientNet: conv_head + bn2 before pooling
        stages.append(("head", nn.Sequential(model.conv_head, model.bn2)))
        return stages, model.global_pool
    if "norm_head" in kids:  # MobileNetV3: pooling precedes conv_head
        stages.append(("head", nn.Sequential(model.global_pool, model.conv_head, model.norm_head, model.act2, model.flatten)))
        return stages, nn.Identity()
    return None


# timm's grouping ------------------------------------------------------------------------------
def _empty_like(module: nn.Module) -> nn.Module:
    """A stand-in that passes its input through (and still iterates, for containers)."""
    for kind in (nn.Sequential, nn.ModuleList, nn.ModuleDict):
        if isinstance(module, kind):
            return kind()
    return nn.Identity()


def _partial_copy(module: nn.Module, keep: set[str], drop: set[str] = frozenset(), *, own: bool,
                  prefix: str = "", kept: bool = False) -> nn.Module:
    """A shallow copy of ``module`` that runs its own ``forward*`` code but holds only the
    submodules named in ``keep`` (minus those in ``drop``); every other one passes its input
    through. ``own``: keep ``module``'s direct parameters and buffers (shared, not copied)."""
    clone = copy.copy(module)
    clone._modules = {}
    if not own:
        clone._parameters, clone._buffers = {}, {}
    for name, child in module._modules.items():
        path = prefix + name
        is_kept = (kept or path in keep) and path not in drop
        below = [p for p in (*keep, *drop) if p.startswith(path + ".")]
        if child is None:
            clone._modules[name] = None
        elif below:
            clone._modules[name] = _partial_copy(child, keep, drop, own=is_kept, prefix=path + ".", kept=is_kept)
        else:
            clone._modules[name] = child if is_kept else _empty_like(child)
    return clone


def _units(module: nn.Module, group_of: dict[str, int], prefix: str = "") -> Iterable[tuple[str, nn.Module]]:
    """The coarsest submodules whose parameters all lie in one timm group (containers whose
    parameters span groups, like ``blocks`` or ``stages``, are opened)."""
    for name, child in module.named_children():
        path = prefix + name
        groups = {group_of[f"{path}.{p}"] for p, _ in child.named_parameters()}
        if len(groups) > 1:
            yield from _units(child, group_of, path + ".")
        else:
            yield path, child


@dataclass
class _Piece:
    """A stage being assembled: the named (parameter-holding) units, all modules, its timm group."""

    names: list[str]
    modules: list[nn.Module]
    group: int | None


@dataclass
class _Call:
    unit: int
    args: tuple
    kwargs: dict
    in_version: int | None
    out: Any = None
    out_version: int | None = None


def _trace_units(model: nn.Module, units: list[nn.Module], x: torch.Tensor) -> tuple[list[_Call], torch.Tensor]:
    """Which units ``forward_features`` calls, in order, with what (tensor versions reveal
    in-place edits between two calls)."""
    calls: list[_Call] = []

    def version(t):
        return t._version if isinstance(t, torch.Tensor) else None

    def before(i):
        def hook(_module, args, kwargs):
            calls.append(_Call(i, args, kwargs, version(args[0]) if len(args) == 1 else None))
        return hook

    def after(i):
        def hook(_module, _args, out):
            call = next(c for c in reversed(calls) if c.unit == i)
            call.out, call.out_version = out, version(out)
        return hook

    handles = []
    try:
        for i, unit in enumerate(units):
            handles.append(unit.register_forward_pre_hook(before(i), with_kwargs=True))
            handles.append(unit.register_forward_hook(after(i)))
        features = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    return calls, features


def _timm_grouped_stages(model: nn.Module, x: torch.Tensor) -> tuple[Stages, nn.Module, torch.Tensor]:
    """Stages along ``model.group_matcher(coarse=True)``, the pool, and ``forward_features(x)``
    (traced on the way); raises NotImplementedError when the model allows no more than one cut."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher") or not hasattr(model, "forward_head"):
        raise NotImplementedError
    group_of = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    try:
        named_units = list(_units(model, group_of))
    except KeyError:  # a parameter shared under two names: no clean ownership by one stage
        raise NotImplementedError from None
    calls, features = _trace_units(model, [m for _, m in named_units], x)
    if not calls or len({c.unit for c in calls}) != len(calls):  # nothing traced, or weights shared
        raise NotImplementedError

    def handed_on(value, value_version, call: _Call) -> bool:
        """``call`` received exactly ``value``, untouched: no code ran between the two modules."""
        return (isinstance(value, torch.Tensor) and not call.kwargs and len(call.args) == 1
                and call.args[0] is value and call.in_version == value_version)

    exit_clean = isinstance(features, torch.Tensor) and features is calls[-1].out and features._version == calls[-1].out_version
    # a cut may go before call i when every hand-over from there on to the output is clean
    first_cut = len(calls)
    while exit_clean and first_cut > 0:
        prev = calls[first_cut - 2] if first_cut > 1 else None
        into = (x, x._version) if prev is None else (prev.out, prev.out_version)
        if not handed_on(*into, calls[first_cut - 1]):
            break
        first_cut -= 1
    stem_calls, chained = calls[:first_cut], calls[first_cut:]
    if not chained:
        raise NotImplementedError

    def unit_group(call: _Call) -> int | None:
        name, unit = named_units[call.unit]
        groups = {group_of[f"{name}.{p}"] for p, _ in unit.named_parameters()}
        return groups.pop() if groups else None

    pieces: list[_Piece] = []
    if stem_calls:
        # the glue between these calls is code in forward_features (ViT: class token, position
        # embedding), so they run as forward_features on a copy of the model holding only them
        keep = {named_units[c.unit][0] for c in stem_calls}
        groups = [g for c in stem_calls if (g := unit_group(c)) is not None]
        groups += [group_of[n] for n in model._parameters if n in group_of]
        pieces.append(_Piece([], [_ForwardFeatures(_partial_copy(model, keep, own=True))], max(groups, default=None)))
    for call in chained:
        name, unit = named_units[call.unit]
        g = unit_group(call)
        last = pieces[-1] if pieces else None
        if last is not None and (g is None or last.group is None or g <= last.group):
            last.modules.append(unit)  # parameter-free units join the group before them
        else:
            last = _Piece([], [unit], g)
            pieces.append(last)
        if g is not None:
            last.names.append(name)
            last.group = g if last.group is None else max(last.group, g)
    if len(pieces) < 2:
        raise NotImplementedError
    stages = [("stem" if i == 0 else "+".join(p.names), p.modules[0] if len(p.modules) == 1 else nn.Sequential(*p.modules))
              for i, p in enumerate(pieces)]

    # the pool: forward_head on a copy holding only the modules forward_features never ran,
    # minus the source classifier (pre-logits never reach it)
    ran = {named_units[c.unit][0].split(".")[0] for c in calls}
    head_side = {n for n, _ in model.named_children() if n not in ran}
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    classifiers = [c for c in (classifier if isinstance(classifier, tuple) else (classifier,)) if isinstance(c, nn.Module)]
    drop = {n for n, m in model.named_modules() if n and any(m is c for c in classifiers)}
    return stages, _PreLogits(_partial_copy(model, head_side, drop, own=False)), features


def staged_backbone(model: nn.Module) -> tuple[Stages, nn.Module]:
    """Split ``model`` into stages whose composition, then ``pool``, equals its pre-logit features.

    The split is verified numerically against ``forward_head(forward_features(x), pre_logits=True)``;
    an architecture we cannot split exactly becomes one stage (freeze all or nothing).
    """
    from timm.models import get_model_input_config

    was_training = model.training
    model.eval()
    adapter = model._modules.pop(INPUT_ADAPTER, None)  # split the model itself; the adapter goes in front
    try:
        cfg = get_model_input_config(model)
        c, h, w = cfg["input_size"]
        if not cfg["fixed_input_size"]:  # a small input is enough to compare, and cheap
            h, w = min(int(h), 96), min(int(w), 96)
        x = torch.randn(2, int(c), int(h), int(w), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            legacy = _efficientnet_family_stages(model)
            if legacy is not None:
                (stages, pool), features = legacy, model.forward_features(x)
                got = _compose(stages, pool, x)
            else:
                try:
                    stages, pool, features = _timm_grouped_stages(model, x)
                    got = _compose(stages, pool, x)
                except Exception as exc:  # noqa: BLE001 - e.g. a partial copy tripped on the model's code: no split
                    raise NotImplementedError from exc
            want = model.forward_head(features, pre_logits=True)
        if got.shape != want.shape or not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise NotImplementedError
    except NotImplementedError:
        stages, pool = [("features", _ForwardFeatures(model))], _PreLogits(model)
    finally:
        model.train(was_training)
        if adapter is not None:
            model._modules[INPUT_ADAPTER] = adapter
    if adapter is not None:
        name, first = stages[0]
        stages[0] = (name, nn.Sequential(adapter, first))
    return stages, pool


def _compose(stages: Stages, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    for _, stage in stages:
        x = stage(x)
    return pool(x)


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
    """stages → pool → head, with the first ``frozen`` stages frozen (no grad, BN in eval).

    The pool's parameters (e.g. ConvNeXt's norm after pooling) train with the last stage: they
    are frozen exactly when every stage is, so the cached pooled features stay valid.
    """

    def __init__(self, stages: Stages, pool: nn.Module, head: nn.Module, frozen: int = 0):
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

    @property
    def pool_frozen(self) -> bool:
        return self.frozen == self.num_stages

    def freeze(self, n: int | str | None) -> None:
        self.frozen = resolve_frozen(n, self.num_stages)
        for i, stage in enumerate(self.stages):
            for p in stage.parameters():
                p.requires_grad_(i >= self.frozen)
        for p in self.pool.parameters():
            p.requires_grad_(not self.pool_frozen)
        self.train(self.training)

    def train(self, mode: bool = True):
        # frozen stages stay in eval mode (their BN statistics never drift); only the trainable part
        # is switched, so a probe's per-epoch train()/eval() does not walk the whole backbone
        self.training = self.stages.training = mode
        for i, stage in enumerate(self.stages):
            want = mode and i >= self.frozen
            if stage.training != want:  # every submodule follows its stage, so the flag says it all
                stage.train(want)
        want = mode and not self.pool_frozen
        if self.pool.training != want:
            self.pool.train(want)
        self.head.train(mode)
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
        """Trainable pretrained parameters (the ones L2-SP pulls towards their start), each once
        (the one-stage fallback's pool shares the stage's parameters)."""
        seen: set[int] = set()
        out = []
        named = [*((f"stages.{n}", p) for n, p in self.stages.named_parameters()),
                 *((f"pool.{n}", p) for n, p in self.pool.named_parameters())]
        for name, p in named:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((name, p))
        return out

    def new_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(f"head.{n}", p) for n, p in self.head.named_parameters()]

    def trainable_modules(self) -> Iterable[nn.Module]:
        return [*self.stages[self.frozen :], *([] if self.pool_frozen else [self.pool]), self.head]

    def stage_module_name(self, stage_name: str) -> str:
        """Module path inside this net of a stage given by its backbone name (e.g. 'blocks.5')."""
        return f"stages.{self.stage_names.index(stage_name)}"


def _pooled_dim(stages: Stages, pool: nn.Module, model: nn.Module) -> int:
    dim = getattr(model, "num_features", None)
    if dim:
        # MobileNetV3's head_hidden_size is what pre-logits emit
        return int(getattr(model, "head_hidden_size", None) or dim)
    from timm.models import get_model_input_config

    x = torch.zeros(1, *get_model_input_config(model)["input_size"])
    for _, s in stages:
        x = s(x)
    return int(pool(x).shape[-1])
