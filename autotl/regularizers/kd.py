"""Feature-map knowledge distillation ("KnowDist" in the DTNH paper, after Yim et al. 2017).

Ω = distance between the feature maps of chosen layers of the network being trained (student, ω)
and of the frozen source network (teacher, ω_s) on the same mini-batch. DTNH paper, Eq. 3:

    Ω(ω, ω_s) = 1/n Σ_j Σ_i ‖F_j(ω, x_i) − F_j(ω_s, x_i)‖²₂

i.e. ``reduction="paper"`` (default): for each layer j, the squared L2 distance of the whole feature
map of one sample (sum over channels × positions), averaged over the n samples of the batch, summed
over layers. Its scale grows with the feature-map size (search λ on a log scale, small values);
``reduction="mean"`` instead averages over all elements of each layer's map (then sums over
layers), a size-independent variant.

Feature maps are captured by forward hooks on the named modules of both networks (names as in
``model.named_modules()``: "blocks.5", "layer3", ...). The teacher is ``source_model`` when given,
else a deep copy of the model taken at ``bind`` (ω_s = the starting point); it must take the same
input as the model (when leading stages are cut off and replaced by cached activations, pass the
matching suffix, or let bind copy the suffix model). The teacher is frozen (requires_grad False)
and run under ``torch.no_grad()``, in eval mode except its normalisation layers: each takes the mode
of the student's layer of the same name at every forward, so both normalise the same way (batch
statistics while the student trains, running statistics in eval) and Ω = 0 at ω = ω_s in either
mode. The teacher's batch-norm momentum is set to 0 at bind, so its running statistics never move.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .base import BaseRegularizer, NamedParams

_REDUCTIONS = ("paper", "mean")


def _available_names(model: nn.Module, limit: int = 80) -> str:
    names = [n for n, _ in model.named_modules() if n]
    if len(names) > limit:  # too many to list: show the stage-level ones (depth <= 2)
        short = [n for n in names if n.count(".") <= 1]
        return ", ".join(short[:limit]) + f" ... ({len(names)} modules in total; any of them is valid)"
    return ", ".join(names)


def _first_tensor(out: Any, name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"FeatureMapKD: layer {name!r} does not output a tensor (got {type(out).__name__})")


class FeatureMapKD(BaseRegularizer):
    """Feature-map distillation regulariser (see module docstring).

    Parameters
    ----------
    layers: module names whose outputs are matched (validated at ``bind``).
    reduction: "paper" (Eq. 3: per-sample squared L2 distance, batch mean, layer sum) or "mean".
    """

    name = "kd"
    shares_graph = True

    def __init__(self, layers: Sequence[str], *, reduction: str = "paper"):
        super().__init__()
        if isinstance(layers, str):
            layers = [layers]
        self.layers = [str(n) for n in layers]
        if not self.layers:
            raise ValueError("FeatureMapKD: `layers` is empty; give at least one module name")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"FeatureMapKD: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.source_model: nn.Module | None = None
        self._handles: list[Any] = []
        self._capture = False
        self._student: dict[str, torch.Tensor] = {}
        self._teacher: dict[str, torch.Tensor] = {}
        self._norm_pairs: list[tuple[nn.Module, nn.Module]] = []  # (student, teacher) normalisation layers

    @classmethod
    def from_config(cls, config, model):
        """Match the configured ``kd_layers`` that are trainable stages of ``model.net``, else its
        last trainable stage. The teacher is the copy of ``model`` that ``bind`` takes (ω_s)."""
        net = model.net
        trainable = net.stage_names[net.frozen :]
        layers = [n for n in config.kd_layers if n in trainable] or trainable[-1:]
        return cls(layers=[f"net.{net.stage_module_name(n)}" for n in layers])

    # -- binding -------------------------------------------------------------------------------
    def _check_layers(self, model: nn.Module, which: str) -> dict[str, nn.Module]:
        modules = dict(model.named_modules())
        missing = [n for n in self.layers if n not in modules or n == ""]
        if missing:
            raise ValueError(
                f"FeatureMapKD: unknown layer name(s) {missing} in the {which} model; "
                f"available: {_available_names(model)}"
            )
        return {n: modules[n] for n in self.layers}

    def bind(self, model, *, shared_params: NamedParams, new_params: NamedParams,
             source_model: nn.Module | None = None):
        self.close()
        student_modules = self._check_layers(model, "trained")
        if source_model is None:
            source_model = copy.deepcopy(model)  # ω_s = current (pretrained) weights
        teacher_modules = self._check_layers(source_model, "source")
        super().bind(model, shared_params=shared_params, new_params=new_params, source_model=source_model)
        source_model.requires_grad_(False)
        source_model.eval()
        self.source_model = source_model
        teacher_norms = {n: m for n, m in source_model.named_modules() if isinstance(m, _NormBase)}
        self._norm_pairs = [(m, teacher_norms[n]) for n, m in model.named_modules()
                            if isinstance(m, _NormBase) and n in teacher_norms]
        for _, t in self._norm_pairs:
            t.momentum = 0.0  # batch statistics in train mode, running statistics left as they are
        for n in self.layers:
            self._handles.append(student_modules[n].register_forward_hook(self._hook("_student", n)))
            self._handles.append(teacher_modules[n].register_forward_hook(self._hook("_teacher", n)))
        return self

    def _hook(self, store: str, name: str):
        def hook(module, inputs, output):
            if self._capture:
                getattr(self, store)[name] = _first_tensor(output, name)
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._student, self._teacher = {}, {}

    # -- per step ------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.source_model is None:
            raise RuntimeError("FeatureMapKD.forward called before bind()")
        if model is not self.model:
            raise ValueError("FeatureMapKD.forward: `model` is not the model given to bind()")
        self._student, self._teacher = {}, {}
        self._capture = True
        try:
            logits = model(x)
            if self.source_model.training:
                self.source_model.eval()
            for student_norm, teacher_norm in self._norm_pairs:  # the same normalisation mode as the student
                teacher_norm.train(student_norm.training)
            with torch.no_grad():
                self.source_model(x)
        finally:
            self._capture = False
        student, teacher = self._student, self._teacher
        self._student, self._teacher = {}, {}
        missing = [n for n in self.layers if n not in student or n not in teacher]
        if missing:
            raise RuntimeError(f"FeatureMapKD: layer(s) {missing} were not run by the forward pass")
        state = {"student": [student[n] for n in self.layers], "teacher": [teacher[n] for n in self.layers]}
        return logits, state

    def penalty(self, state: Any) -> torch.Tensor:
        if state is None:
            raise ValueError("FeatureMapKD.penalty needs the state returned by FeatureMapKD.forward")
        total = None
        for name, fs, ft in zip(self.layers, state["student"], state["teacher"]):
            if fs.shape != ft.shape:
                raise ValueError(f"FeatureMapKD: layer {name!r} shapes differ: trained {tuple(fs.shape)} "
                                 f"vs source {tuple(ft.shape)}")
            sq = (fs.float() - ft.float()).pow(2)  # float32 even when the maps come from bf16 autocast
            term = sq.mean() if self.reduction == "mean" else sq.sum() / max(fs.shape[0], 1)
            total = term if total is None else total + term
        return total

    def __repr__(self) -> str:
        return f"FeatureMapKD(layers={self.layers!r}, reduction={self.reduction!r})"
