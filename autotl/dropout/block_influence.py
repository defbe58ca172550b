"""Influence of each training image through the last trainable block, not only the convex head.

The convex-head influence (``influence.py``) treats the backbone as fixed. This variant takes the
parameters of a trainable block (for autotl: the network's last stage, fed with the cached
activation at its input) *and* the softmax head, θ = (θ_b, W, b), and uses Koh & Liang's influence
with Hessian-vector products, as the paper's eq. 1-2 do for the whole trained network:

    J(θ) = (1/N) Σ_i CE(W φ(a_i; θ_b) + b, y_i) + (l2/2) (‖θ_b − θ_b⁰‖² + ‖W‖² + ‖b‖²)

φ: the block followed by pooling, then a fixed centring and scaling (training statistics at θ_b⁰,
as ``strategy._standardise``: the same ``l2`` means the same for every backbone). θ_b⁰: the
pretrained block; the L2-SP anchor keeps the optimum next to it and adds l2·I to the Hessian.

1. θ̂ = argmin J: the convex head is fitted exactly on φ(·; θ_b⁰) first, then L-BFGS (strong Wolfe)
   moves block and head together until ‖∇J‖ ≤ ``fit_tol`` (or ``fit_max_iter``).
2. s = (H + damping·I)⁻¹ g_val by conjugate gradient, H v from double backward (Hessian-vector
   products, never H itself), g_val = Σ_j ∇ CE(val_j) at θ̂ (the total validation loss).
3. score_i = −(1/N) ∇CE_i(θ̂) · s for all i, the directional derivative of every per-sample loss
   along s (one reverse-over-reverse pass per chunk, no per-sample gradients stored).

Sign and scale as in ``influence.py``: score_i is the predicted reduction of the total validation
loss when image i is removed (weight 0 under the 1/N normalisation); > 0 = harmful, which is what
the paper's Algorithm A drops. The normalisation layers run in eval mode (running statistics), so
each image's loss depends on that image only.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import AutotlError
from .influence import InfluenceResult, fit_logistic_head

__all__ = ["BlockHead", "block_influence_scores"]


class BlockHead(nn.Module):
    """block → pooled features → fixed (x − μ)/scale → linear head: the model whose influence is taken."""

    def __init__(self, block: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.block = block
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))

    def features(self, a: torch.Tensor) -> torch.Tensor:
        return (self.block(a) - self.mu) / self.scale

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(a))


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


class _Objective:
    """J, ∇J and H v of the block + head on the training activations, in chunks."""

    def __init__(self, model: BlockHead, a: torch.Tensor, y: torch.Tensor, l2: float, chunk: int):
        self.model, self.a, self.y, self.l2, self.chunk = model, a, y, float(l2), chunk
        self.params = [p for p in model.parameters() if p.requires_grad]
        block_ids = {id(p) for p in model.block.parameters()}
        # anchors: θ_b⁰ for the block, 0 for the head
        self.anchor = [p.detach().clone() if id(p) in block_ids else torch.zeros_like(p) for p in self.params]
        self.n = a.shape[0]

    def _reg(self) -> torch.Tensor:
        return 0.5 * self.l2 * sum(((p - a0) ** 2).sum() for p, a0 in zip(self.params, self.anchor))

    def value_and_grad(self) -> tuple[float, list[torch.Tensor]]:
        total = 0.0
        grads = [torch.zeros_like(p) for p in self.params]
        for sl in _chunks(self.n, self.chunk):
            loss = nn.functional.cross_entropy(self.model(self.a[sl]), self.y[sl], reduction="sum") / self.n
            for g, d in zip(grads, torch.autograd.grad(loss, self.params)):
                g.add_(d)
            total += float(loss.detach())
        reg = self._reg()
        for g, d in zip(grads, torch.autograd.grad(reg, self.params)):
            g.add_(d)
        return total + float(reg.detach()), grads

    def hvp(self, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = [self.l2 * t.clone() for t in v]
        for sl in _chunks(self.n, self.chunk):
            loss = nn.functional.cross_entropy(self.model(self.a[sl]), self.y[sl], reduction="sum") / self.n
            g = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
            for o, h in zip(out, torch.autograd.grad(dot, self.params)):
                o.add_(h)
        return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def _cg(hvp, rhs: list[torch.Tensor], damping: float, rtol: float, max_iter: int):
    """Conjugate gradient for (H + damping I) s = rhs on lists of tensors. Returns (s, iterations, stop reason)."""
    s = [torch.zeros_like(t) for t in rhs]
    r = [t.clone() for t in rhs]
    d = [t.clone() for t in rhs]
    rr = _dot(r, r)
    bnorm = math.sqrt(rr)
    if bnorm == 0:
        return s, 0, "zero right-hand side"
    it, reason = 0, "max_iter"
    for it in range(1, max_iter + 1):
        hd = [h + damping * x for h, x in zip(hvp(d), d)]
        curv = _dot(d, hd)
        if curv <= 0:  # the Hessian is not positive definite along d: θ̂ is no minimum (raise damping)
            reason = "non-positive curvature"
            break
        alpha = rr / curv
        for si, di in zip(s, d):
            si.add_(di, alpha=alpha)
        for ri, hi in zip(r, hd):
            ri.sub_(hi, alpha=alpha)
        rr_new = _dot(r, r)
        if math.sqrt(rr_new) <= rtol * bnorm:
            reason = "converged"
            break
        beta = rr_new / rr
        for di, ri in zip(d, r):
            di.mul_(beta).add_(ri)
        rr = rr_new
    return s, it, reason


def _as_tensor(x, dtype) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device="cpu", dtype=dtype)


def block_influence_scores(
    block: nn.Module,
    train_a,
    train_y,
    val_a,
    val_y,
    num_classes: int,
    *,
    l2: float = 1e-2,
    focus_class: int | None = None,
    damping: float = 0.0,
    cg_tol: float = 1e-6,
    cg_max_iter: int = 100,
    fit_tol: float = 1e-7,
    fit_max_iter: int = 50,
    chunk: int = 256,
    dtype: torch.dtype = torch.float64,
) -> tuple[InfluenceResult, BlockHead]:
    """Influence of every training image on the total validation loss through ``block`` and a head.

    ``block`` maps a batch of activations ``train_a`` (N, ...) to pooled features (N, D); its
    parameters with ``requires_grad`` are the trainable ones (it is copied, never modified). Returns
    (result, the fitted model θ̂). ``result.solver`` is ``"block-cg"``; ``result.residual`` the
    relative CG residual; ``result.train_grad_norm`` ‖∇J(θ̂)‖ (influence assumes ~0).
    """
    import copy

    t0 = time.perf_counter()
    if not (l2 > 0):
        raise ValueError(f"l2 must be > 0, got {l2}")
    a = _as_tensor(train_a, dtype)
    y = _as_tensor(train_y, torch.long).reshape(-1)
    av = _as_tensor(val_a, dtype)
    yv = _as_tensor(val_y, torch.long).reshape(-1)
    if a.shape[0] == 0 or a.shape[0] != y.numel():
        raise ValueError(f"train_a has {a.shape[0]} rows for {y.numel()} labels")
    if focus_class is not None:
        keep = yv == int(focus_class)
        if not bool(keep.any()):
            raise AutotlError(f"focus class {focus_class} has no validation images; add some to its val folder "
                              "or drop the focus class")
        av, yv = av[keep], yv[keep]
    if av.shape[0] == 0:
        raise AutotlError("influence scores need validation images; add a val split")

    block = copy.deepcopy(block).to(dtype).eval()  # running statistics: per-image losses
    with torch.no_grad():
        feats0 = torch.cat([block(a[sl]) for sl in _chunks(a.shape[0], chunk)])
    if feats0.ndim != 2:
        raise ValueError(f"block must output pooled (N, D) features, got shape {tuple(feats0.shape)}")
    model = BlockHead(block, feats0.shape[1], num_classes).to(dtype)
    with torch.no_grad():
        mu = feats0.mean(0)
        scale = float(((feats0 - mu) ** 2).sum(1).mean().sqrt()) or 1.0
        model.mu.copy_(mu)
        model.scale.fill_(scale)
        head0 = fit_logistic_head(((feats0 - mu) / scale).double(), y, num_classes, l2=l2)
        model.head.weight.copy_(torch.as_tensor(head0.W))
        model.head.bias.copy_(torch.as_tensor(head0.b))
    obj = _Objective(model, a, y, l2, chunk)
    if not any(id(p) in {id(q) for q in block.parameters()} for p in obj.params):
        raise ValueError("block has no trainable parameters: use the convex-head influence (influence_scores)")

    # 1. θ̂: L-BFGS on block + head from (θ_b⁰, the convex head)
    opt = torch.optim.LBFGS(obj.params, lr=1.0, max_iter=fit_max_iter, tolerance_grad=fit_tol,
                            tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=True)
        value, grads = obj.value_and_grad()
        for p, g in zip(obj.params, grads):
            p.grad = g
        return torch.tensor(value, dtype=dtype)

    opt.step(closure)
    _, grads = obj.value_and_grad()
    grad_norm = math.sqrt(_dot(grads, grads))

    # 2. s = (H + damping I)^-1 g_val
    g_val = [torch.zeros_like(p) for p in obj.params]
    for sl in _chunks(av.shape[0], chunk):
        loss = nn.functional.cross_entropy(model(av[sl]), yv[sl], reduction="sum")
        for g, d in zip(g_val, torch.autograd.grad(loss, obj.params)):
            g.add_(d)
    s, iters, reason = _cg(obj.hvp, g_val, float(damping), cg_tol, cg_max_iter)
    hs = obj.hvp(s)
    res = [h + damping * x - g for h, x, g in zip(hs, s, g_val)]
    gnorm = math.sqrt(_dot(g_val, g_val))
    residual = math.sqrt(_dot(res, res)) / gnorm if gnorm > 0 else 0.0

    # 3. ∇CE_i · s for every i: d/du of (∇_θ Σ_i u_i CE_i) · s, with u a dummy of ones
    n = a.shape[0]
    directional = torch.empty(n, dtype=dtype)
    probs = torch.empty(n, num_classes, dtype=dtype)
    for sl in _chunks(n, chunk):
        logits = model(a[sl])
        ce = nn.functional.cross_entropy(logits, y[sl], reduction="none")
        u = torch.ones_like(ce, requires_grad=True)
        g = torch.autograd.grad((u * ce).sum(), obj.params, create_graph=True)
        directional[sl] = torch.autograd.grad(sum((gi * si).sum() for gi, si in zip(g, s)), u)[0].detach()
        probs[sl] = torch.softmax(logits.detach(), 1)
    scores = -directional / n
    rows = torch.arange(n)
    result = InfluenceResult(
        scores=scores.double().numpy(), predicted=probs.argmax(1).numpy(), prob_given=probs[rows, y].double().numpy(),
        solver="block-cg", residual=residual, cg_iterations=iters, seconds=time.perf_counter() - t0,
        n_reference=int(av.shape[0]), focus_class=None if focus_class is None else int(focus_class),
        train_grad_norm=grad_norm,
    )
    model.cg_stop = reason  # why CG ended (converged / max_iter / non-positive curvature)
    return result, model
