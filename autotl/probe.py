"""Linear probes on frozen features, solved to optimality, many at once.

A probe is multinomial logistic regression with an L2 penalty on standardised features (each
feature centred and scaled by its training mean and spread), the convex problem that wins on small
data when it is solved to convergence and regularised well (Kornblith et al. 2019; the scikit-learn
``LogisticRegression`` recipe). A cross-validated trial needs one such problem per fold and per
penalty; here every fold is one problem of a batch, solved together:

- when a problem has fewer training rows than features (the usual case: tens to hundreds of images,
  thousands of features) it is solved in the span of its rows, exactly: the solution of an
  L2-penalised linear model lies there (representer theorem), so one thin SVD of the standardised
  rows turns ``d`` unknowns per class into at most ``n``;
- Newton's method with Jacobi-preconditioned conjugate gradients on closed-form Hessian-vector
  products, a backtracking line search per problem, float64 in the reduced space;
- a path of penalties is solved from the strongest to the weakest, each started where the path
  through the two previous solutions, extrapolated in log(lambda), points (predictor-corrector path
  following), or from the previous solution where that is the better start.

The feature layout a probe reads is a ``FeatureSpec``: which backbones (concatenated), how many
intermediate-stage taps of each (pooled activations, Head2Toe-style), and whether it trains on the
left-right flipped view too and averages its predictions over both views (flip test-time
augmentation). ``ProbeNet`` is the same computation as one module, for the exported graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .estimate import fold_spread_se
from .options import ProbeOptions
from .strategy import BaseStrategy

__all__ = ["FeatureSpec", "ProbeFeatures", "parse_backbones", "ReducedFeatures", "ProbeSolution", "feature_matrix", "feature_blocks", "ProbeNet", "ProbeModel", "merge_probes",
           "DEFAULT_LAMBDAS", "BIAS_L2"]

# Penalties of the mean objective on standardised features: from strong (a near-constant head) to
# weak (almost unregularised). sklearn's C = 1 on n images is lambda = 1/n.
DEFAULT_LAMBDAS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
PROB_FLOOR = 1e-6  # as autotl.ensemble: log-probabilities of averaged probabilities are floored alike
BIAS_L2 = 1e-6  # softmax is invariant to a common bias shift: a trace of damping keeps H definite
_STD_FLOOR = 1e-6
GRAM_RTOL = 1e-10  # eigenvalues of the Gram matrix below this fraction of the largest are rounding


@dataclass(frozen=True)
class FeatureSpec:
    """What a probe reads: ``models`` (candidate labels, concatenated in this order), ``taps`` (the
    pooled outputs of each model's last ``taps`` stages before its final one, beside its pooled
    features) and ``flip`` (train on both views, predict with the mean over both)."""

    models: tuple[str, ...]
    taps: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a probe reads at least one model's features")
        if self.taps < 0:
            raise ValueError(f"taps must be >= 0, got {self.taps}")

    @property
    def views(self) -> tuple[str, ...]:
        return ("center", "flip") if self.flip else ("center",)

    def describe(self) -> str:
        what = " + ".join(self.models)
        extra = [f"{self.taps} intermediate stage(s) each"] if self.taps else []
        extra += ["flip views + flip TTA"] if self.flip else []
        return what + (f" ({', '.join(extra)})" if extra else "")

    def to_json(self) -> dict[str, Any]:
        return {"models": list(self.models), "taps": self.taps, "flip": self.flip}


def feature_blocks(spec: FeatureSpec, extractors: dict[str, Any]) -> list[tuple[str, int | None]]:
    """The concatenated blocks, in order: ``(model, cut)`` for a tap, ``(model, None)`` for pooled."""
    blocks: list[tuple[str, int | None]] = []
    for label in spec.models:
        ex = extractors[label]
        taps = list(ex.tap_cuts)[-spec.taps:] if spec.taps else []
        blocks += [(label, None)] + [(label, c) for c in taps]
    return blocks


def feature_matrix(spec: FeatureSpec, extractors: dict[str, Any], samples: Sequence, view: str = "center") -> torch.Tensor:
    """``(n, d)`` float32: the blocks of ``spec`` for ``samples`` seen as ``view`` (cached passes)."""
    samples = list(samples)
    parts = []
    acts = {}
    for label, cut in feature_blocks(spec, extractors):
        if label not in acts:
            acts[label] = extractors[label].extract(samples, view=view, description=f"{view} features")
        a = acts[label]
        parts.append(a.pooled if cut is None else a.taps[cut])
    return torch.cat([p.float() for p in parts], dim=1)


# ------------------------------------------------------------------------------------- the strategy
def parse_backbones(value: Any, candidates: Sequence[str]) -> tuple[str, ...]:
    """``"1+2"`` (rank positions among the run's ranked candidates, 1 = the top one) → their labels;
    positions beyond the candidates are dropped (a recipe written for three models on a run with one)."""
    text = "1" if value is None else str(value)
    try:
        picks = [int(p) for p in text.split("+")]
    except ValueError:
        from .errors import AutotlError

        raise AutotlError(f"backbones {value!r}: give rank positions joined by '+', e.g. 1, 2 or 1+2+3") from None
    if not picks or min(picks) < 1 or len(set(picks)) != len(picks):
        from .errors import AutotlError

        raise AutotlError(f"backbones {value!r}: rank positions start at 1 and appear once each")
    labels = tuple(candidates[p - 1] for p in picks if p <= len(candidates))
    return labels or (candidates[0],)


class ProbeFeatures(BaseStrategy):
    """What a linear probe reads: ``backbones`` (which ranked candidates' features, concatenated:
    ``"1"``, ``"2"``, ``"1+2+3"``), ``taps`` (pooled intermediate-stage features of each, from the
    last ``taps`` stages before the final one; Evci et al. 2022, Head2Toe) and ``flip`` (train on the
    mirrored images too and average predictions over both views). Computed once per run through the
    frozen backend; the exported graph computes the same layout (``ProbeNet``)."""

    name = "features"
    params = ("backbones", "taps", "flip") + ProbeOptions.params()

    def is_active(self, params: dict[str, Any]) -> bool:
        return self._layout_given(params) or _penalty_rule(params) != ProbeOptions.penalty_rule

    @staticmethod
    def _layout_given(params: dict[str, Any]) -> bool:
        return str(params.get("backbones") or "1") != "1" or bool(params.get("taps")) or bool(params.get("flip"))

    def apply(self, ctx, params: dict[str, Any]) -> None:
        if self._layout_given(params):
            models = parse_backbones(params.get("backbones"), ctx.candidates)
            ctx.features = FeatureSpec(models, int(params.get("taps") or 0), bool(params.get("flip")))
            ctx.notes[self.name] = {**ctx.features.to_json(), "description": ctx.features.describe()}
        rule = _penalty_rule(params)
        if rule != ProbeOptions.penalty_rule:
            ctx.choose_penalty = PENALTY_CHOICE[rule]
            ctx.notes["penalty_rule"] = rule

    def describe(self, params: dict[str, Any]) -> str:
        parts = [f"features of ranked model(s) {params.get('backbones') or '1'}"] if self._layout_given(params) else []
        if params.get("taps"):
            parts.append(f"+ {params['taps']} intermediate stage(s) each")
        if params.get("flip"):
            parts.append("+ flipped views, flip TTA")
        if _penalty_rule(params) != ProbeOptions.penalty_rule:
            parts.append(("+ " if parts else "") + f"penalty by the {_penalty_rule(params)} rule")
        return " ".join(parts)


def _penalty_rule(params: dict[str, Any]) -> str:
    opts = ProbeOptions.of(None, params)
    opts.check()  # a recipe's value is checked where it is read
    return opts.penalty_rule


def penalty_one_se(lambdas: Sequence[float], fold_losses: Sequence[Sequence[float]], oof_losses: Sequence[float],
                   k: int | None = None) -> int:
    """The strongest penalty whose out-of-fold log loss is within one standard error (of the best
    penalty's fold losses, ``fold_spread_se``; ``k``: folds per partition) of the least one."""
    best = min(range(len(oof_losses)), key=lambda i: oof_losses[i])
    losses = list(fold_losses[best])
    se = fold_spread_se(losses, k or len(losses))
    near = [i for i in range(len(oof_losses)) if oof_losses[i] <= oof_losses[best] + se]
    return max(near, key=lambda i: lambdas[i])


# how each ``ProbeOptions.penalty_rule`` but the default picks (``StrategyContext.choose_penalty``)
PENALTY_CHOICE = {"one_se": penalty_one_se}


# ------------------------------------------------------------------------------------- the solver
@dataclass
class ProbeSolution:
    """Probe heads for a batch of problems and a path of penalties, in the reduced coordinates of the
    ``ReducedFeatures`` they were fitted on: ``theta[l]`` is ``(r + 1, B, K)`` (weights, then the bias
    row) for penalty ``l`` and problem ``b``."""

    theta: torch.Tensor  # (L, r + 1, B, K)
    lambdas: tuple[float, ...]
    newton_iterations: list[int] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None  # (L, B)


class ReducedFeatures:
    """One feature matrix over a fixed list of rows (every labelled image, in each view), standardised
    and reduced once so that every probe on any subset of its rows is a small problem.

    Standardisation uses every row (no label is read: it is part of the feature map, fixed before any
    fold is cut). When there are fewer rows than features, ``z = U S`` of the thin SVD
    ``x_std = U S V^T``: any probe trained on a subset of these rows has its weights in the span of
    ``V`` (representer theorem), so solving for ``w`` with ``W = V w`` is exact and
    ``||W|| = ||w||``. Every problem of a batch (a fold, a bag member) reads the same ``z`` with its
    own row weights, so each step of the solver is one matrix product for all of them."""

    def __init__(self, x: torch.Tensor, reread: Callable[[], torch.Tensor] | None = None):
        """``reread``: a function that returns ``x`` again. With it the ``(d, r)`` map back to raw features
        (what only ``head`` reads) is not kept but computed when asked for: trials never ask, and the
        memory that holds one layout's reduction then holds several."""
        x = x.float()
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"features must be (N, d) with N > 0, got {tuple(x.shape)}")
        self.n_rows, self.dim = x.shape
        mean = x.mean(0)
        scale = x.std(0, unbiased=False)
        self.mean = mean
        self.scale = torch.where(scale > _STD_FLOOR, scale, torch.ones_like(scale))
        xs = (x - mean) / self.scale
        self._reread = reread
        self._basis: torch.Tensor | None = None
        self.reduced = self.n_rows < self.dim
        if self.reduced:
            # the thin SVD through the rows' Gram matrix (float64): an N x N eigenproblem costs a fraction
            # of an N x d SVD; directions with no spread (centred rows span at most N - 1) are dropped
            xd = xs.double()
            ev, u = torch.linalg.eigh(xd @ xd.T)
            keep = ev > GRAM_RTOL * ev[-1].clamp_min(1e-300)
            ev, u = ev[keep].flip(0), u[:, keep].flip(1)
            self._sv = ev.sqrt()
            z = u * self._sv  # (N, r)
            if reread is None:
                self._basis = self._map_back(xd, z)
        else:
            z = xs
        # the bias as a last column of ones: scores, gradients and Hessian products are single products
        self.z = torch.cat([z, torch.ones(self.n_rows, 1)], dim=1).to(SOLVER_DTYPE)

    def _map_back(self, xs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``V`` ``(d, r)`` of ``x_std = U S V^T`` from the standardised rows: ``V = x_std^T U S / S^2``."""
        return ((xs.double().T @ z) / (self._sv * self._sv)).float().contiguous()

    @property
    def basis(self) -> torch.Tensor | None:
        """``V`` ``(d, r)``: reduced weights ``w`` are ``V w`` on standardised features (None: not reduced)."""
        if not self.reduced:
            return None
        if self._basis is not None:
            return self._basis
        x = self._reread().float()
        if tuple(x.shape) != (self.n_rows, self.dim):
            raise ValueError(f"reread features are {tuple(x.shape)}, reduced from {(self.n_rows, self.dim)}")
        return self._map_back((x - self.mean) / self.scale, self.z[:, :-1])

    @property
    def rank(self) -> int:
        return int(self.z.shape[1]) - 1

    @property
    def nbytes(self) -> int:
        """Memory held (what a run's bounded memory counts)."""
        parts = [self.z, self.mean, self.scale] + ([self._basis] if self._basis is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)

    def solve(self, problems: Sequence[Sequence[int]], labels: torch.Tensor, num_classes: int,
              lambdas: Sequence[float] = DEFAULT_LAMBDAS, *, tol: float = 1e-6, max_iter: int = 50) -> ProbeSolution:
        """Fit one probe per entry of ``problems`` (each a list of row indices: its training rows), rows
        labelled by ``labels`` (``(N,)``), for every penalty (strongest first: each warm-starts the
        next). Minimises the mean cross-entropy over the problem's rows + ``lambda/2 ||W||^2`` (+ a
        trace on the bias)."""
        if not lambdas or min(lambdas) <= 0:
            raise ValueError("lambdas must be positive")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (self.n_rows,):
            raise ValueError(f"labels must be ({self.n_rows},), got {tuple(labels.shape)}")
        b = len(problems)
        w = torch.zeros(b, self.n_rows, dtype=SOLVER_DTYPE)
        for i, rows in enumerate(problems):
            idx = torch.as_tensor(sorted(set(int(r) for r in rows)), dtype=torch.long)
            if idx.numel() == 0:
                raise ValueError(f"problem {i} has no training rows")
            w[i, idx] = 1.0 / idx.numel()
        y1 = _one_hot(labels, num_classes, SOLVER_DTYPE).T.contiguous()  # (K, N)
        path = [float(v) for v in lambdas]
        solved: list[torch.Tensor] = []  # (K, B, r + 1) per penalty so far
        thetas, iters, norms = [], [], []
        shared = _Rows(self.z)
        for li, lam in enumerate(path):
            f = _Batch(shared, y1, w, torch.full((b,), lam, dtype=SOLVER_DTYPE))
            start = (_path_start(f, path[:li + 1], solved) if solved else
                     torch.zeros(num_classes, b, self.rank + 1, dtype=SOLVER_DTYPE))
            theta, it, gn = _newton(f, start, tol, max_iter)
            solved.append(theta)
            thetas.append(theta.permute(2, 1, 0))  # (r + 1, B, K), the layout ``logits`` and ``head`` read
            iters.append(it)
            norms.append(gn.float())
        return ProbeSolution(torch.stack(thetas), tuple(path), iters, torch.stack(norms))

    def logits(self, theta: torch.Tensor, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
        """``theta`` ``(r + 1, B, K)`` → ``(m, B, K)`` float32 logits of ``rows`` (all rows when None)."""
        z = self.z if rows is None else self.z[torch.as_tensor(rows, dtype=torch.long)]
        r1, b, k = theta.shape
        return (z @ theta.reshape(r1, b * k)).reshape(-1, b, k).float()

    def head(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``theta`` ``(r + 1, B, K)`` → ``(weight (B, d, K), bias (B, K))`` on raw features:
        ``logits = x @ weight + bias`` (the reduction and the standardisation folded in)."""
        wr = theta[:-1].permute(1, 0, 2).float()  # (B, r, K)
        basis = self.basis
        w_std = basis @ wr if basis is not None else wr
        weight = w_std / self.scale[:, None]
        bias = theta[-1].float() - torch.einsum("d,bdk->bk", self.mean, weight)
        return weight, bias


SOLVER_DTYPE = torch.float64


def _one_hot(y: torch.Tensor, k: int, dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(y.clamp_min(0), k).to(dtype)


class _Rows:
    """The shared rows ``z`` ``(N, r + 1)`` in the forms the solver multiplies by: float64 for values and
    gradients, float32 for Hessian products, squared for the Jacobi preconditioner."""

    def __init__(self, z: torch.Tensor):
        self.z, self.zt = z, z.T.contiguous()
        self.z32, self.zt32 = z.float(), self.zt.float()
        self.z2_32 = (z * z).float()


class _Batch:
    """Softmax regression objective of B problems on the shared rows ``z`` ``(N, r + 1)`` (bias column
    last). Parameters ``theta`` are ``(K, B, r + 1)`` and per-row tensors ``(K, B, N)``: classes outermost,
    so that the softmax's sums over K add a few whole vectors (PyTorch reduces a trailing dimension of
    2 or 10 slowly), and every product with the rows is one 2-D matrix product for all problems.
    ``w`` ``(B, N)``: row weights (each problem's sum to 1, 0 = not its row); ``y1`` ``(K, N)`` one-hot.

    Values and gradients are float64 (they decide convergence); the inner conjugate-gradient solve,
    its Hessian-vector products and the preconditioner are float32: CG only needs an approximate
    Newton direction, and the float64 gradient and line search keep the optimum where float64 puts it."""

    def __init__(self, rows: _Rows, y1: torch.Tensor, w: torch.Tensor, lam: torch.Tensor):
        self.rows = rows
        self.w = w[None]  # (1, B, N)
        self.wy = self.w * y1[:, None, :]  # (K, B, N)
        r1, b = rows.z.shape[1], w.shape[0]
        reg = lam.view(1, b, 1).expand(1, b, r1).clone()
        reg[..., -1] = BIAS_L2
        self.reg, self.reg32, self.w32 = reg, reg.float(), self.w.float()

    def scores(self, theta: torch.Tensor) -> torch.Tensor:
        k, b, r1 = theta.shape
        return (theta.reshape(k * b, r1) @ self.rows.zt).view(k, b, -1)

    def _back(self, a: torch.Tensor) -> torch.Tensor:
        k, b, n = a.shape
        return (a.reshape(k * b, n) @ self.rows.z).view(k, b, -1)

    def _penalty(self, theta: torch.Tensor) -> torch.Tensor:
        return 0.5 * _dot(self.reg * theta, theta)

    def _log_softmax(self, scores: torch.Tensor) -> torch.Tensor:
        top = scores.max(0, keepdim=True).values
        shifted = scores - top
        return shifted - shifted.exp().sum(0, keepdim=True).log()

    def value(self, theta: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The objective at ``theta`` whose scores (``z @ theta``) are ``scores``."""
        return -_dot(self.wy, self._log_softmax(scores)) + self._penalty(theta)

    def value_grad(self, theta: torch.Tensor, scores: torch.Tensor):
        logp = self._log_softmax(scores)
        value = -_dot(self.wy, logp) + self._penalty(theta)
        p = logp.exp()
        grad = self._back(self.w * p - self.wy) + self.reg * theta
        return value, grad, p

    def hvp(self, v: torch.Tensor, p32: torch.Tensor) -> torch.Tensor:
        """float32 ``H v`` (the softmax Hessian per row: ``diag(p) - p p^T``)."""
        k, b, r1 = v.shape
        u = (v.reshape(k * b, r1) @ self.rows.zt32).view(k, b, -1)
        pu = p32 * u
        a = self.w32 * (pu - p32 * pu.sum(0, keepdim=True))
        return (a.view(k * b, -1) @ self.rows.z32).view(k, b, r1) + self.reg32 * v

    def diagonal(self, p: torch.Tensor) -> torch.Tensor:
        q = (self.w * p * (1.0 - p)).float()  # (K, B, N)
        k, b, n = q.shape
        return (q.view(k * b, n) @ self.rows.z2_32).view(k, b, -1) + self.reg32


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per problem (dimension 1) inner products of ``(K, B, m)`` tensors."""
    return (a * b).sum(2).sum(0)


def _norm(a: torch.Tensor) -> torch.Tensor:
    return _dot(a, a).sqrt()


def _pcg(f: _Batch, p: torch.Tensor, rhs: torch.Tensor, inv_diag: torch.Tensor, rtol: torch.Tensor, max_iter: int,
         active: torch.Tensor) -> torch.Tensor:
    """Preconditioned CG for ``H s = rhs`` on every active problem at once (per-problem step sizes), in
    float32."""
    p32, rhs, rtol = p.float(), rhs.float(), rtol.float()
    s = torch.zeros_like(rhs)
    r = rhs.clone()
    zr = inv_diag * r
    d = zr.clone()
    rz = _dot(r, zr)
    bnorm = _norm(rhs)
    todo = active & (bnorm > 0)
    for _ in range(max_iter):
        if not bool(todo.any()):
            break
        hd = f.hvp(d, p32)
        curv = _dot(d, hd)
        ok = todo & (curv > 0)
        alpha = torch.where(ok, rz / torch.where(curv > 0, curv, torch.ones_like(curv)), torch.zeros_like(curv))
        s = s + alpha.view(1, -1, 1) * d
        r = r - alpha.view(1, -1, 1) * hd
        todo = ok & (_norm(r) > rtol * bnorm)
        zr = inv_diag * r
        rz_new = _dot(r, zr)
        beta = torch.where(todo, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        d = zr + beta.view(1, -1, 1) * d
        rz = rz_new
    return s.double()


def _path_start(f: _Batch, lambdas: Sequence[float], solved: Sequence[torch.Tensor]) -> torch.Tensor:
    """Where Newton starts at the last of ``lambdas`` (the path so far, all positive), given the
    solutions at the ones before it (``solved``): the path extrapolated linearly in log(lambda)
    through the last two solutions (a predictor step of path following: the solution path is smooth
    in log(lambda), so the corrector then needs one or two Newton steps where a plain warm start
    needs four), or the last solution itself for a problem where that is the better start (lower
    objective)."""
    last = solved[-1]
    if len(solved) < 2 or lambdas[-2] == lambdas[-3]:
        return last
    ratio = math.log(lambdas[-1] / lambdas[-2]) / math.log(lambdas[-2] / lambdas[-3])
    guess = last + ratio * (last - solved[-2])
    better = f.value(guess, f.scores(guess)) < f.value(last, f.scores(last))
    return torch.where(better.view(1, -1, 1), guess, last)


def _newton(f: _Batch, theta: torch.Tensor, tol: float, max_iter: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    scores = f.scores(theta)
    value, grad, p = f.value_grad(theta, scores)
    gnorm = _norm(grad)
    goal = tol * gnorm.clamp_min(1.0)
    it = 0
    while it < max_iter:
        active = gnorm > goal
        if not bool(active.any()):
            break
        it += 1
        # inexact Newton: CG reduces the residual by sqrt(|g|) (superlinear convergence), but never by
        # more than the tolerance asks for: a step whose linear model reaches half the goal ends the solve
        forcing = torch.maximum(gnorm.sqrt(), 0.5 * goal / gnorm.clamp_min(1e-300)).clamp(max=0.1)
        step = _pcg(f, p, -grad, 1.0 / f.diagonal(p), forcing, 200, active)
        slope = _dot(grad, step)
        bad = slope >= 0  # not a descent direction (numerical breakdown): the gradient step
        step = torch.where(bad.view(1, -1, 1), -grad, step)
        slope = torch.where(bad, -gnorm * gnorm, slope)
        dscores = f.scores(step)  # scores are linear in theta: every trial point of the search is free
        t = torch.where(active, torch.ones_like(value), torch.zeros_like(value))
        pending = active.clone()
        new_theta, new_scores = theta, scores
        for _ in range(30):
            tv = t.view(1, -1, 1)
            cand, cand_scores = theta + tv * step, scores + tv * dscores
            cand_value = f.value(cand, cand_scores)
            ok = pending & (cand_value <= value + 1e-4 * t * slope + 1e-12 * value.abs())
            okv = ok.view(1, -1, 1)
            new_theta = torch.where(okv, cand, new_theta)
            new_scores = torch.where(okv, cand_scores, new_scores)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            t = torch.where(pending, t * 0.5, t)
        stuck = pending  # no decrease found: as optimal as the arithmetic allows
        theta, scores = new_theta, new_scores
        value, grad, p = f.value_grad(theta, scores)
        gnorm = torch.where(stuck, torch.zeros_like(gnorm), _norm(grad))
    return theta, it, _norm(grad)


# ------------------------------------------------------------------------------------- a fitted probe
@dataclass
class ProbeModel:
    """A fitted probe on raw features of ``spec``'s layout: ``weight`` ``(H, d, K)``, ``bias`` ``(H, K)``
    (H > 1: several heads whose probabilities are averaged with ``head_weights`` — bagged fold models,
    or the probes of an ensemble merged onto one layout), ``lam`` its penalty. ``flip_heads`` (H,):
    which heads average over the mirrored view too (default: ``spec.flip`` for all)."""

    spec: FeatureSpec
    weight: torch.Tensor
    bias: torch.Tensor
    lam: float
    n_train: int
    head_weights: torch.Tensor | None = None
    flip_heads: torch.Tensor | None = None

    def __post_init__(self) -> None:
        h = int(self.weight.shape[0])
        if self.head_weights is None:
            self.head_weights = torch.full((h,), 1.0 / h)
        if self.flip_heads is None:
            self.flip_heads = torch.full((h,), bool(self.spec.flip))
        self.head_weights = self.head_weights.double() / self.head_weights.double().sum()
        self.flip_heads = self.flip_heads.bool()
        if bool(self.flip_heads.any()) and not self.spec.flip:
            raise ValueError("a head averages over the mirrored view, but the layout does not compute it (spec.flip)")

    def probs(self, extractors: dict[str, Any], samples: Sequence) -> torch.Tensor:
        """``(n, K)`` float64 probabilities: each head's over its views, then the heads' weighted mean."""
        per_view = {}
        for view in self.spec.views:
            x = feature_matrix(self.spec, extractors, samples, view)
            logits = torch.einsum("nd,hdk->hnk", x, self.weight) + self.bias[:, None, :]
            per_view[view] = torch.softmax(logits.double(), dim=-1)  # (H, n, K)
        heads = per_view["center"]
        if "flip" in per_view:
            both = 0.5 * (per_view["center"] + per_view["flip"])
            heads = torch.where(self.flip_heads[:, None, None], both, heads)
        return torch.einsum("h,hnk->nk", self.head_weights, heads)

    def logits(self, extractors: dict[str, Any], samples: Sequence) -> torch.Tensor:
        """Log-probabilities, as ``ProbeNet`` returns them."""
        return torch.log(self.probs(extractors, samples).clamp_min(PROB_FLOOR)).float()

    def net(self, extractors: dict[str, Any]) -> "ProbeNet":
        """The exported module: the backbones' frozen stages, taps, concatenation, heads, flip TTA."""
        backbones = []
        for label in self.spec.models:
            ex = extractors[label]
            taps = [c for lab, c in feature_blocks(self.spec, extractors) if lab == label and c is not None]
            backbones.append(([m for _, m in ex.stages], ex.pool, taps))
        return ProbeNet(backbones, self.weight, self.bias, flip=self.flip_heads, head_weights=self.head_weights)


def merge_probes(models: Sequence[ProbeModel], weights: Sequence[float], extractors: dict[str, Any]) -> ProbeModel:
    """Several probes (an ensemble's members) as one probe over the union of their layouts: each
    backbone computed once, each member's heads reading its own blocks (zeros elsewhere), weighted
    by the member's weight over its heads. The same probabilities as the members averaged."""
    order = list(dict.fromkeys(label for m in models for label in m.spec.models))
    union = FeatureSpec(tuple(order), max(m.spec.taps for m in models), any(m.spec.flip for m in models))
    union_blocks, union_sizes = feature_blocks(union, extractors), _block_widths(union, extractors)
    width = sum(union_sizes)
    offsets = dict(zip(union_blocks, _starts(union_sizes)))
    heads_w, heads_b, head_weights, flips = [], [], [], []
    total = float(sum(weights))
    for m, w in zip(models, weights):
        blocks = feature_blocks(m.spec, extractors)
        sizes = _block_widths(m.spec, extractors)
        h, _, k = m.weight.shape
        full = torch.zeros(h, width, k)
        start = 0
        for block, size in zip(blocks, sizes):
            full[:, offsets[block]:offsets[block] + size] = m.weight[:, start:start + size]
            start += size
        heads_w.append(full)
        heads_b.append(m.bias)
        head_weights.append(m.head_weights.float() * (float(w) / total))
        flips.append(m.flip_heads)
    return ProbeModel(union, torch.cat(heads_w), torch.cat(heads_b), float("nan"), max(m.n_train for m in models),
                      torch.cat(head_weights), torch.cat(flips))


def _block_widths(spec: FeatureSpec, extractors: dict[str, Any]) -> list[int]:
    return [int(extractors[label].feature_width(cut)) for label, cut in feature_blocks(spec, extractors)]


def _starts(sizes: Sequence[int]) -> list[int]:
    starts, pos = [], 0
    for size in sizes:
        starts.append(pos)
        pos += size
    return starts


# ------------------------------------------------------------------------------------- the graph
class ProbeNet(nn.Module):
    """A probe as one module: each backbone's stages (frozen) and pooling, its taps pooled, the blocks
    concatenated as ``FeatureSpec`` lays them out, then H linear heads whose probabilities are averaged
    with ``head_weights`` (bagged fold heads, or merged ensemble members); a head with ``flip`` also
    averages over the image's mirror. Returns log-probabilities (logits whose softmax is the
    averaged probabilities)."""

    def __init__(self, backbones: Sequence[tuple[Sequence[nn.Module], nn.Module, Sequence[int]]], weight: torch.Tensor,
                 bias: torch.Tensor, *, flip: bool | Sequence[bool] | torch.Tensor = False,
                 head_weights: Sequence[float] | torch.Tensor | None = None):
        """``backbones``: per model ``(stages, pool, tap_cuts)``; ``weight`` ``(H, d, K)`` or ``(d, K)``,
        ``bias`` ``(H, K)`` or ``(K,)``; ``flip`` one flag or one per head; ``head_weights`` (H,)
        (default: equal)."""
        super().__init__()
        self.stages = nn.ModuleList(nn.ModuleList(st) for st, _, _ in backbones)
        self.pools = nn.ModuleList(pool for _, pool, _ in backbones)
        self.tap_cuts = [tuple(int(c) for c in taps) for _, _, taps in backbones]
        weight = weight if weight.ndim == 3 else weight[None]
        bias = bias if bias.ndim == 2 else bias[None]
        h = int(weight.shape[0])
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        hw = torch.full((h,), 1.0 / h) if head_weights is None else torch.as_tensor(head_weights, dtype=torch.float32)
        self.register_buffer("head_weights", (hw / hw.sum()).float())
        flips = torch.as_tensor(flip, dtype=torch.bool).reshape(-1).expand(h) if not isinstance(flip, bool) \
            else torch.full((h,), flip)
        self.register_buffer("flip_mask", flips.float().reshape(h, 1, 1).clone())
        self.any_flip = bool(flips.any())
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        from .backend import global_pool

        parts = []
        for stages, pool, taps in zip(self.stages, self.pools, self.tap_cuts):
            a, tapped = x, {}
            for i, stage in enumerate(stages):
                if i in taps:
                    tapped[i] = global_pool(a)
                a = stage(a)
            parts += [pool(a)] + [tapped[c] for c in taps]
        return torch.cat(parts, dim=1)

    def _head_probs(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        logits = torch.einsum("nd,hdk->hnk", f, self.weight) + self.bias[:, None, :]
        return torch.softmax(logits, dim=-1)  # (H, n, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.any_flip:
            # both views in one batch: the exported graph holds the backbones once, not twice (export
            # time grows with the graph's size)
            both = self._head_probs(torch.cat([x, x.flip(-1)]))
            heads, mirrored = both[:, :x.shape[0]], both[:, x.shape[0]:]
            heads = heads + self.flip_mask * 0.5 * (mirrored - heads)  # flip heads: the mean over both views
        else:
            heads = self._head_probs(x)
        probs = torch.einsum("h,hnk->nk", self.head_weights, heads)
        return torch.log(probs.clamp_min(PROB_FLOOR))
