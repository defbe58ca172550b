"""DTNH: "Towards Making Deep Transfer Learning Never Hurt" (Wan, Xiong, Li, Zhu, Huan), Algorithm 1.

Per mini-batch, ∇J (empirical loss) and ∇Ω (regulariser) are computed separately. If the angle
between them is obtuse (⟨∇J, ∇Ω⟩ < 0), the component of ∇Ω along ∇J is removed (Eqs. 6-7):

    ∇Ω_x = ⟨∇J, ∇Ω⟩ / ‖∇J‖² · ∇J,     ∇Ω_y = ∇Ω − ∇Ω_x,     d = ∇J + λ ∇Ω_y

otherwise d = ∇J + λ∇Ω (Algorithm 1, line 8; the text's "λĴ_t + λ∇Ω^y" is a typo for line 11).
d is then handed to any optimiser (SGD, momentum, Adam...) in place of the usual gradient.

Granularity: the paper treats ω ∈ R^d as ONE vector of all parameters (Definition 1, Eq. 4,
Algorithm 1), so the inner product and the projection are global: ``granularity="global"``
(default). ``granularity="layer"`` is an extension that applies the same rule to each parameter
tensor separately (guarantees ⟨d_l, ∇J_l⟩ ≥ 0 per tensor, hence globally as well).

All vector algebra uses ``torch._foreach_*`` over the list of parameter tensors (one dot / norm per
tensor, no flattened copy of the model) and one host sync per step.

The paper also decays the regularisation coefficient per epoch by a ratio in [0, 1]:
``CoefficientSchedule(lam0, decay)(epoch) = lam0 * decay**epoch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .base import BaseRegularizer, _dense, flat_dot

GRANULARITIES = ("global", "layer")


@dataclass(frozen=True)
class StepStats:
    """What one ``regularized_backward`` step did (plain floats, for logging).

    inner: ⟨∇J, ∇Ω⟩ over all parameters, before projection. cos_j_omega: cos ∠(∇J, ∇Ω).
    cos_d_j / cos_d_omega: cos of the paper's "Angle 1" ∠(d, ∇J) and "Angle 2" ∠(d, ∇Ω) for the
    direction d actually written to ``.grad``. projected: whether any projection happened;
    n_projected / n_groups: how many groups (1 global group, or parameter tensors) were projected.
    Cosines are NaN when a norm is 0 or when ∇Ω was skipped (λ = 0 or no-op regulariser).
    """

    loss: float
    penalty: float
    lam: float
    inner: float
    cos_j_omega: float
    cos_d_j: float
    cos_d_omega: float
    projected: bool
    n_projected: int
    n_groups: int
    norm_j: float
    norm_omega: float
    norm_d: float


def _cos(a: float, na2: float, nb2: float) -> float:
    den = math.sqrt(max(na2, 0.0) * max(nb2, 0.0))
    return a / den if den > 0 else float("nan")


def _dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([flat_dot(x, y) for x, y in zip(a, b)])


def _sq_norms(a: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(list(a))).double().pow(2)


def _projection_coefs(dots: list[float], nj2: list[float], *, dtnh: bool, granularity: str) -> list[float]:
    """c_t such that ∇Ω_y = ∇Ω − c_t ∇J on tensor t (0 where no projection)."""
    n = len(dots)
    if not dtnh:
        return [0.0] * n
    if granularity == "global":
        inner, nj = math.fsum(dots), math.fsum(nj2)
        c = inner / nj if (inner < 0 and nj > 0) else 0.0
        return [c] * n
    return [d / j if (d < 0 and j > 0) else 0.0 for d, j in zip(dots, nj2)]


def _combine(gj: list[torch.Tensor], go: list[torch.Tensor], lam: float, coefs: list[float],
             *, inplace: bool) -> list[torch.Tensor]:
    """d_t = (1 − λ c_t) ∇J_t + λ ∇Ω_t."""
    if all(c == 0.0 for c in coefs):
        if inplace:
            torch._foreach_add_(gj, go, alpha=lam)
            return gj
        return list(torch._foreach_add(gj, go, alpha=lam))
    scale = [1.0 - lam * c for c in coefs]
    if inplace:
        torch._foreach_mul_(gj, scale)
        d = gj
    else:
        d = list(torch._foreach_mul(gj, scale))
    torch._foreach_add_(d, go, alpha=lam)
    return d


def _owned(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make a list of autograd outputs safe to modify in place and to store as ``.grad``: autograd
    may return expanded (stride-0) tensors or the same tensor for several inputs; copy those."""
    seen: set[int] = set()
    out = []
    for t in ts:
        ptr = t.data_ptr()
        if not _dense(t) or ptr in seen:
            t = t.clone()
            ptr = t.data_ptr()
        seen.add(ptr)
        out.append(t)
    return out


def _check(lam: float, granularity: str) -> float:
    lam = float(lam)
    if not (lam >= 0.0 and math.isfinite(lam)):
        raise ValueError(f"regularisation coefficient lam must be a finite number >= 0, got {lam}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return lam


def _stats(loss: float, penalty: float, lam: float, dots, nj2, no2, coefs, granularity) -> StepStats:
    inner, nj, no = math.fsum(dots), math.fsum(nj2), math.fsum(no2)
    a = [1.0 - lam * c for c in coefs]
    d_j = math.fsum(ai * j + lam * dt for ai, j, dt in zip(a, nj2, dots))
    d_o = math.fsum(ai * dt + lam * o for ai, dt, o in zip(a, dots, no2))
    nd2 = max(math.fsum(ai * ai * j + 2 * ai * lam * dt + lam * lam * o
                        for ai, j, dt, o in zip(a, nj2, dots, no2)), 0.0)
    if granularity == "global":
        n_groups, n_proj = 1, int(bool(coefs) and coefs[0] != 0.0)
    else:
        n_groups, n_proj = len(coefs), sum(c != 0.0 for c in coefs)
    return StepStats(
        loss=loss, penalty=penalty, lam=lam, inner=inner,
        cos_j_omega=_cos(inner, nj, no), cos_d_j=_cos(d_j, nd2, nj), cos_d_omega=_cos(d_o, nd2, no),
        projected=n_proj > 0, n_projected=n_proj, n_groups=n_groups,
        norm_j=math.sqrt(nj), norm_omega=math.sqrt(no), norm_d=math.sqrt(nd2),
    )


def dtnh_direction(
    grads_j: Sequence[torch.Tensor],
    grads_omega: Sequence[torch.Tensor],
    lam: float,
    *,
    dtnh: bool = True,
    granularity: str = "global",
    inplace: bool = False,
) -> tuple[list[torch.Tensor], StepStats]:
    """The update direction from per-tensor gradient lists ∇J and ∇Ω (same shapes, no None).

    Returns (d, stats); with ``dtnh=False`` d = ∇J + λ∇Ω. ``inplace=True`` reuses ``grads_j``'s
    storage for d. ``stats.loss`` / ``stats.penalty`` are NaN here (no loss given).
    """
    lam = _check(lam, granularity)
    gj, go = list(grads_j), list(grads_omega)
    if len(gj) != len(go):
        raise ValueError(f"dtnh_direction: {len(gj)} loss gradients vs {len(go)} regulariser gradients")
    if not gj:
        raise ValueError("dtnh_direction: empty gradient lists")
    vals = torch.cat([_dots(gj, go).double(), _sq_norms(gj), _sq_norms(go)]).tolist()  # one sync
    n = len(gj)
    dots, nj2, no2 = vals[:n], vals[n:2 * n], vals[2 * n:]
    coefs = _projection_coefs(dots, nj2, dtnh=dtnh, granularity=granularity)
    d = _combine(gj, go, lam, coefs, inplace=inplace)
    return d, _stats(float("nan"), float("nan"), lam, dots, nj2, no2, coefs, granularity)


def regularized_backward(
    loss_J: torch.Tensor,
    reg: BaseRegularizer,
    state: Any,
    lam: float,
    *,
    dtnh: bool = False,
    params: Sequence[torch.Tensor] | None = None,
    granularity: str = "global",
) -> StepStats:
    """Write the update direction into ``.grad`` of every trainable parameter; return stats.

    ``params``: the trainable parameters (default: ``reg.trainable_params()``, i.e. the bound shared
    + new parameters with requires_grad); parameters with requires_grad False are skipped. ∇J comes
    from ``torch.autograd.grad(loss_J, params)``, ∇Ω from ``reg.gradients(params, state)``; a
    missing (None) gradient counts as zeros; a parameter with neither keeps ``.grad = None`` (the
    optimiser skips it, as after a plain ``backward``). Existing ``.grad`` values are replaced, not
    accumulated. Then call ``optimizer.step()``.
    """
    lam = _check(lam, granularity)
    params = [p for p in (reg.trainable_params() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("regularized_backward: no trainable parameters (bind the regulariser or pass params)")
    skip_omega = reg.is_noop or lam == 0.0
    gj = list(torch.autograd.grad(loss_J, params, allow_unused=True,
                                  retain_graph=(not skip_omega) and reg.shares_graph))
    go = [None] * len(params) if skip_omega else list(reg.gradients(params, state))
    if len(go) != len(params):
        raise RuntimeError(f"{type(reg).__name__}.gradients returned {len(go)} tensors for {len(params)} params")
    with torch.no_grad():
        penalty = reg.penalty(state)
        penalty = penalty.detach() if isinstance(penalty, torch.Tensor) else torch.tensor(float(penalty))

    used = [i for i in range(len(params)) if gj[i] is not None or go[i] is not None]
    used_set = set(used)
    for i, p in enumerate(params):
        if i not in used_set:
            p.grad = None
    if not used:
        nan = float("nan")
        return StepStats(float(loss_J.detach()), float(penalty), lam, nan, nan, nan, nan, False, 0, 0,
                         0.0, 0.0, 0.0)
    # autograd outputs (deduplicated, contiguous) or zeros: reused in place for the direction
    uj = _owned([gj[i] if gj[i] is not None else torch.zeros_like(params[i]) for i in used])
    dev = uj[0].device
    head = torch.stack([loss_J.detach().double().reshape(()).to(dev), penalty.double().reshape(()).to(dev)])
    n = len(used)
    if skip_omega:  # d = ∇J; ∇Ω treated as 0 in the stats
        vals = torch.cat([head, _sq_norms(uj)]).tolist()  # one sync
        dots, nj2, no2 = [0.0] * n, vals[2:], [0.0] * n
        coefs = [0.0] * n
        d = uj
    else:
        uo = [go[i] if go[i] is not None else torch.zeros_like(params[i]) for i in used]
        vals = torch.cat([head, _dots(uj, uo).double(), _sq_norms(uj), _sq_norms(uo)]).tolist()  # one sync
        dots, nj2, no2 = vals[2:2 + n], vals[2 + n:2 + 2 * n], vals[2 + 2 * n:]
        coefs = _projection_coefs(dots, nj2, dtnh=dtnh, granularity=granularity)
        d = _combine(uj, uo, lam, coefs, inplace=True)
    stats = _stats(vals[0], vals[1], lam, dots, nj2, no2, coefs, granularity)
    for i, t in zip(used, d):
        params[i].grad = t
    return stats


@dataclass(frozen=True)
class CoefficientSchedule:
    """Per-epoch decay of the regularisation coefficient (DTNH paper, §V-A: "regularization
    coefficient decays at certain ratio, ranging from 0 to 1, per epoch"): λ_e = λ0 · decay^e."""

    lam0: float
    decay: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.lam0) and self.lam0 >= 0):
            raise ValueError(f"CoefficientSchedule: lam0 must be a finite number >= 0, got {self.lam0}")
        if not (0.0 <= self.decay <= 1.0):
            raise ValueError(f"CoefficientSchedule: decay must be in [0, 1], got {self.decay}")

    def __call__(self, epoch: int) -> float:
        if epoch < 0:
            raise ValueError(f"CoefficientSchedule: epoch must be >= 0, got {epoch}")
        return float(self.lam0 * self.decay ** int(epoch))

    def values(self, epochs: int) -> list[float]:
        return [self(e) for e in range(epochs)]
