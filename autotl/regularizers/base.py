"""Extension point for transfer-learning regularisers Ω(ω, ω_s).

A regulariser is bound once to the model being trained (``bind``), then used per mini-batch:

    logits, state = reg.forward(model, x)          # default: model(x), None
    loss_J = criterion(logits, y)
    stats = regularized_backward(loss_J, reg, state, lam, dtnh=True)   # autotl.regularizers.dtnh
    optimizer.step()

``penalty(state)`` is the (differentiable) value of Ω; ``gradients(params, state)`` is ∇Ω for the
given parameters (default: autograd through ``penalty``; subclasses with a closed form override it).
The regulariser only ever sees the parameters it is given: frozen stages, or stages cut off and
replaced by cached activations, are simply absent from ``shared_params``.

A regulariser builds itself from a ``TrainConfig`` (``from_config``), so adding one is one new module
with a ``BaseRegularizer`` subclass + one ``REGULARIZERS.register`` line below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from .._registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from ..train_config import TrainConfig

NamedParams = Sequence[tuple[str, nn.Parameter]]


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last))


def _flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of a dense tensor in memory order (no copy, also for channels_last)."""
    return t.as_strided((t.numel(),), (1,))


def flat_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """⟨x, y⟩ of two same-shape tensors without copying when they share a dense layout."""
    if x.stride() == y.stride() and _dense(x):
        return torch.dot(_flat(x), _flat(y))
    return torch.dot(x.reshape(-1), y.reshape(-1))


class BaseRegularizer(ABC):
    """Base class of a regulariser Ω(ω, ω_s) (extension point): implement ``from_config`` and
    ``penalty`` (and ``gradients`` where a closed form exists).

    Class attributes
    ----------------
    name: registry name.
    shares_graph: True when Ω depends on the forward graph of the mini-batch (e.g. feature maps), so
        the graph must be retained after computing ∇J. Conservative default True; regularisers of the
        weights only (L2-SP) set False.
    is_noop: True when Ω ≡ 0 (the training loop can skip the second gradient).
    replaces_weight_decay: True when Ω already pulls the weights towards a reference (L2-SP: ω_s), so
        the optimiser's weight decay, a pull towards zero that would fight it, is off whenever this
        regulariser is the configured one.
    """

    name: str = "base"
    shares_graph: bool = True
    is_noop: bool = False
    replaces_weight_decay: bool = False

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.shared_params: list[tuple[str, nn.Parameter]] = []
        self.new_params: list[tuple[str, nn.Parameter]] = []

    @classmethod
    @abstractmethod
    def from_config(cls, config: "TrainConfig", model: nn.Module) -> "BaseRegularizer":
        """The (unbound) regulariser a training run with ``config`` uses on ``model``, the module
        being trained (``autotl.stages.SuffixView``: ``model.net`` is the ``TransferNet``)."""

    @classmethod
    def is_active(cls, config: "TrainConfig") -> bool:
        """Whether a run with ``config`` uses this regulariser at all (default: λ = reg_lambda > 0)."""
        return config.reg_lambda > 0

    @classmethod
    def coefficient(cls, config: "TrainConfig") -> float:
        """λ0, the weight the training loop gives Ω before the per-epoch decay (default reg_lambda).
        A regulariser whose coefficients live inside Ω (L2-SP's α, β) returns 1."""
        return float(config.reg_lambda)

    # -- binding -------------------------------------------------------------------------------
    def bind(
        self,
        model: nn.Module,
        *,
        shared_params: NamedParams,
        new_params: NamedParams,
        source_model: nn.Module | None = None,
    ) -> "BaseRegularizer":
        """Record what Ω needs. Call after the model is on its device and before the first step
        (the parameters' current values are taken as the starting point ω_s where relevant)."""
        self.model = model
        self.shared_params = [(str(n), p) for n, p in shared_params]
        self.new_params = [(str(n), p) for n, p in new_params]
        return self

    @property
    def params(self) -> list[nn.Parameter]:
        """All bound parameters (shared first, then new)."""
        return [p for _, p in self.shared_params] + [p for _, p in self.new_params]

    def trainable_params(self) -> list[nn.Parameter]:
        """Bound parameters that currently require grad (what ``regularized_backward`` updates by
        default)."""
        return [p for p in self.params if p.requires_grad]

    def close(self) -> None:
        """Release hooks / buffers (no-op by default)."""

    # -- per step ------------------------------------------------------------------------------
    def forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Forward pass of the model being trained; returns (logits, state for ``penalty``)."""
        return model(x), None

    @abstractmethod
    def penalty(self, state: Any) -> torch.Tensor:
        """Value of Ω (a differentiable scalar tensor)."""

    def gradients(
        self, params: Sequence[torch.Tensor], state: Any
    ) -> list[torch.Tensor | None]:
        """∇Ω w.r.t. ``params`` (None where Ω does not depend on a parameter).

        Default: autograd through ``penalty``. Frees the graph it uses (it is the last consumer of
        the step's graph in ``regularized_backward``).
        """
        params = list(params)
        omega = self.penalty(state)
        if not isinstance(omega, torch.Tensor) or not omega.requires_grad:
            return [None] * len(params)
        return list(torch.autograd.grad(omega, params, allow_unused=True, retain_graph=False))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NoRegularizer(BaseRegularizer):
    """Ω ≡ 0: plain fine-tuning."""

    name = "none"
    shares_graph = False
    is_noop = True

    @classmethod
    def from_config(cls, config, model):
        return cls()

    @classmethod
    def is_active(cls, config) -> bool:
        return False

    def penalty(self, state: Any) -> torch.Tensor:
        p = self.params
        if p:
            return torch.zeros((), device=p[0].device, dtype=p[0].dtype)
        return torch.zeros(())

    def gradients(self, params, state):
        return [None] * len(list(params))


# One line per regulariser; the order is the order they are listed in (recipes, messages).
REGULARIZERS: Registry[BaseRegularizer] = Registry("regularizer", BaseRegularizer)
REGULARIZERS.register("none", "autotl.regularizers.base:NoRegularizer", order=10)
REGULARIZERS.register("l2sp", "autotl.regularizers.l2sp:L2SP", order=20)
REGULARIZERS.register("kd", "autotl.regularizers.kd:FeatureMapKD", order=30)


def list_regularizers() -> list[str]:
    """Registered regulariser names, in registry order."""
    return REGULARIZERS.names()


def create_regularizer(name: str, **kwargs: Any) -> BaseRegularizer:
    """The regulariser registered as ``name`` (case-insensitive) built with its constructor kwargs;
    an unknown name raises ``UnknownNameError`` (a ValueError) listing the known ones."""
    return REGULARIZERS.create(name, **kwargs)


def regularizer_class(config: "TrainConfig") -> type[BaseRegularizer]:
    """The class ``config.regularizer`` names (unknown names raise ``UnknownNameError``)."""
    name = config.regularizer
    if REGULARIZERS.key(name) != name:  # the optimiser reads the name as written too (turns_off_weight_decay)
        raise UnknownNameError(f"regularizer {name!r}: write it as {REGULARIZERS.key(name)!r}")
    return REGULARIZERS.get_class(name)


def turns_off_weight_decay(config: "TrainConfig") -> bool:
    """Whether the regulariser ``config.regularizer`` names, spelled as registered, replaces the
    optimiser's weight decay (``replaces_weight_decay``), whatever its coefficients."""
    name = config.regularizer
    return name in REGULARIZERS and REGULARIZERS.key(name) == name and REGULARIZERS.get_class(name).replaces_weight_decay


def regularizer_from_config(config: "TrainConfig", model: nn.Module) -> BaseRegularizer | None:
    """The (unbound) regulariser ``config.regularizer`` names, built by its class from ``config``;
    None when the configured coefficients switch it off (``is_active``)."""
    cls = regularizer_class(config)
    return cls.from_config(config, model) if cls.is_active(config) else None
