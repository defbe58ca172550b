"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): weight decay towards the pretrained starting point.

    Ω(ω) = α/2 ‖ω_S − ω_S⁰‖²  +  β/2 ‖ω_new‖²

ω_S: the trainable pretrained ("shared") parameters, ω_S⁰ their values at ``bind`` time (the
starting point); ω_new: the new classification head (no pretrained reference, so plain L2).
∇Ω = α(ω_S − ω_S⁰), β ω_new in closed form with ``torch._foreach_*`` (no extra backward).

Which parameters: the DTNH paper (Eq. 2, ω ∈ R^d "containing all d parameters of the target model")
and the L2-SP paper both regularise the whole parameter vector, so by default every trainable
parameter is included: conv/linear weights, biases and normalisation (BN) affine parameters.
``exclude_norm_and_bias=True`` drops all 1-D parameters (biases, norm scales/shifts: the timm
weight-decay convention) from both terms. BN running statistics are buffers, never regularised.

Scale: built from a ``TrainConfig``, α = ``reg_lambda`` and β = ``reg_beta`` are the paper's (α, β)
and the training loop weights Ω by λ0 = 1 (``coefficient``; the per-epoch decay still applies), so
every combination means what it says: (α, 0) pulls only the pretrained weights, (0, β) only decays
the head, (0, 0) is no regulariser. The constructor defaults α = 1, β = 0.1 (the paper's ratio β/α
= 0.1) are for direct use with a separate λ.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .base import BaseRegularizer, NamedParams, flat_dot


def _sq_norm_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ ‖t‖² over a list of tensors (differentiable, one dot per tensor)."""
    return torch.stack([flat_dot(t, t) for t in tensors]).sum()


class L2SP(BaseRegularizer):
    """L2-SP regulariser (see module docstring)."""

    name = "l2sp"
    shares_graph = False
    replaces_weight_decay = True

    def __init__(self, alpha: float = 1.0, beta: float = 0.1, *, exclude_norm_and_bias: bool = False):
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"L2SP: alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.exclude_norm_and_bias = bool(exclude_norm_and_bias)
        self._sp: list[nn.Parameter] = []  # shared params regularised towards a reference
        self._ref: list[torch.Tensor] = []  # ω_S⁰, aligned with _sp
        self._new: list[nn.Parameter] = []  # head params regularised towards 0
        self._ref_of: dict[int, int] = {}  # id(param) -> index in _sp / _ref
        self._new_ids: set[int] = set()

    @classmethod
    def from_config(cls, config, model):
        return cls(alpha=config.reg_lambda, beta=config.reg_beta)

    @classmethod
    def is_active(cls, config) -> bool:
        return config.reg_lambda > 0 or config.reg_beta > 0

    @classmethod
    def coefficient(cls, config) -> float:
        return 1.0  # α and β are inside Ω

    def _keep(self, p: torch.Tensor) -> bool:
        return not (self.exclude_norm_and_bias and p.ndim <= 1)

    def bind(self, model, *, shared_params: NamedParams, new_params: NamedParams, source_model=None):
        super().bind(model, shared_params=shared_params, new_params=new_params, source_model=source_model)
        self._sp = [p for _, p in self.shared_params if self._keep(p)]
        self._ref = [p.detach().clone() for p in self._sp]
        self._new = [p for _, p in self.new_params if self._keep(p)]
        self._ref_of = {id(p): i for i, p in enumerate(self._sp)}
        self._new_ids = {id(p) for p in self._new}
        overlap = set(self._ref_of) & self._new_ids
        if overlap:
            raise ValueError("L2SP.bind: a parameter is in both shared_params and new_params")
        return self

    def _sync_device(self) -> None:
        if self._ref and self._ref[0].device != self._sp[0].device:
            self._ref = [r.to(p.device) for r, p in zip(self._ref, self._sp)]

    def penalty(self, state: Any = None) -> torch.Tensor:
        self._sync_device()
        terms = []
        if self._sp and self.alpha:
            terms.append(0.5 * self.alpha * _sq_norm_sum(torch._foreach_sub(self._sp, self._ref)))
        if self._new and self.beta:
            terms.append(0.5 * self.beta * _sq_norm_sum(self._new))
        if not terms:
            p = self.params
            return torch.zeros((), device=p[0].device) if p else torch.zeros(())
        return torch.stack(terms).sum()

    @torch.no_grad()
    def gradients(self, params: Sequence[torch.Tensor], state: Any = None) -> list[torch.Tensor | None]:
        """Closed form: α(ω_S − ω_S⁰) for shared, β ω_new for the head, None for anything else."""
        self._sync_device()
        params = list(params)
        out: list[torch.Tensor | None] = [None] * len(params)
        sp_idx, sp_p, sp_r, new_idx, new_p = [], [], [], [], []
        for i, p in enumerate(params):
            j = self._ref_of.get(id(p))
            if j is not None:
                sp_idx.append(i)
                sp_p.append(p)
                sp_r.append(self._ref[j])
            elif id(p) in self._new_ids:
                new_idx.append(i)
                new_p.append(p)
        if sp_p:
            g = torch._foreach_sub(sp_p, sp_r)
            torch._foreach_mul_(g, self.alpha)
            for i, t in zip(sp_idx, g):
                out[i] = t
        if new_p:
            g = torch._foreach_mul(new_p, self.beta)
            for i, t in zip(new_idx, g):
                out[i] = t
        return out

    def __repr__(self) -> str:
        return (f"L2SP(alpha={self.alpha}, beta={self.beta}, "
                f"exclude_norm_and_bias={self.exclude_norm_and_bias})")
