"""LogME: log of maximum evidence (You et al., ICML 2021, "LogME: Practical Assessment of
Pre-trained Models for Transfer Learning").

For each target class k, regress the one-hot indicator y_k (N,) on the features F (N, D) with
Bayesian linear regression: prior m ~ N(0, alpha^-1 I), noise y_k | F, m ~ N(F m, beta^-1 I).
The log evidence (marginal likelihood) is, with A = alpha I + beta F^T F and
m = beta A^-1 F^T y the posterior mean,

    L(alpha, beta) = N/2 log beta + D/2 log alpha - N/2 log 2 pi
                     - beta/2 ||y - F m||^2 - alpha/2 m^T m - 1/2 log det A.

It is maximised over (alpha, beta) by MacKay's fixed point iteration, starting from
alpha = beta = 1:

    gamma = sum_i beta s_i^2 / (alpha + beta s_i^2),
    alpha <- gamma / m^T m,     beta <- (N - gamma) / ||y - F m||^2,

whose fixed points are exactly the stationary points of L. Everything is expressed through one
thin SVD F = U diag(s) V^T (k = rank F <= min(N, D) singular values) computed once for all
classes: with z = U^T y,

    m^T m         = sum_i (beta s_i z_i / (alpha + beta s_i^2))^2
    ||y - F m||^2 = sum_i (alpha z_i / (alpha + beta s_i^2))^2 + (||y||^2 - ||z||^2)
    log det A     = sum_i log(alpha + beta s_i^2) + (D - k) log alpha,

the last term accounting for the D - k directions with no data when N < D. LogME is the mean
over classes of L(alpha*, beta*) / N. Higher is better; it is a log-likelihood per sample, so
values are comparable across models with different feature sizes D on the same target set.

Unlike the authors' reference code (at most 11 iterations, tolerance 1e-3) the iteration runs
to a tight tolerance (relative parameter change < 1e-10, or evidence change < 1e-11 per sample:
when no feature direction helps a class the maximum lies at alpha -> inf and is approached
geometrically but slowly), so scores can differ from the reference in the last digits.
The thin SVD is obtained from the eigendecomposition of the smaller Gram matrix (see
`_svd_projection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._rank import _as_float64, _as_labels

__all__ = ["logme", "logme_fit", "log_evidence", "LogMEResult"]

_MAX_ITER = 3000
_RTOL = 1e-10
_EV_TOL = 1e-11
_LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True, eq=False)
class LogMEResult:
    """score: LogME (mean over classes of max log evidence / N); alpha, beta, evidence: per
    class (K,) optimal prior / noise precisions and max log evidence / N; iterations: number of
    fixed-point steps; converged: whether every class met the tolerance."""

    score: float
    alpha: np.ndarray
    beta: np.ndarray
    evidence: np.ndarray
    iterations: int
    converged: bool


def log_evidence(F: Any, y: Any, alpha: float, beta: float) -> float:
    """Log evidence log p(y | F, alpha, beta) of Bayesian linear regression, total (not / N).

    Direct closed form with the full D x D matrix A = alpha I + beta F^T F (Bishop, PRML
    eq. 3.86); O(D^3), meant for checks on small problems, not for scoring.
    """
    F = _as_float64(F, "F", 2)
    y = _as_float64(y, "y", 1)
    n, d = F.shape
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} entries but F has {n} rows")
    if alpha <= 0 or beta <= 0:
        raise ValueError("alpha and beta must be > 0")
    A = alpha * np.eye(d) + beta * (F.T @ F)
    m = beta * np.linalg.solve(A, F.T @ y)
    resid = y - F @ m
    sign, logdet = np.linalg.slogdet(A)
    if sign <= 0:
        raise np.linalg.LinAlgError("A = alpha I + beta F^T F is not positive definite")
    return float(
        0.5 * n * math.log(beta)
        + 0.5 * d * math.log(alpha)
        - 0.5 * n * _LOG_2PI
        - 0.5 * beta * float(resid @ resid)
        - 0.5 * alpha * float(m @ m)
        - 0.5 * logdet
    )


def _evidence_svd(s2, z, res_perp, n, d, alpha, beta):
    """Vectorised L(alpha, beta) for K targets. s2 (k,), z (k, K), res_perp/alpha/beta (K,)."""
    denom = alpha[None, :] + beta[None, :] * s2[:, None]  # (k, K)
    mtm = np.sum((beta[None, :] * np.sqrt(s2)[:, None] * z / denom) ** 2, axis=0)
    res = np.sum((alpha[None, :] * z / denom) ** 2, axis=0) + res_perp
    logdet = np.sum(np.log(denom), axis=0) + (d - s2.size) * np.log(alpha)
    return (
        0.5 * n * np.log(beta)
        + 0.5 * d * np.log(alpha)
        - 0.5 * n * _LOG_2PI
        - 0.5 * beta * res
        - 0.5 * alpha * mtm
        - 0.5 * logdet
    )


def _svd_projection(F: np.ndarray, Y: np.ndarray):
    """SVD quantities of F for targets Y (N, K): (s^2 (k,), z = U^T Y (k, K), ||Y - U U^T Y||^2).

    The thin SVD F = U diag(s) V^T comes from the symmetric eigendecomposition of the smaller
    Gram matrix (F F^T when N <= D, F^T F when N > D), which is several times cheaper than a
    direct SVD of a tall F. When N > D, U = F V / s is only needed through z, and directions
    with s^2 below a relative cut-off (numerically zero) are dropped: a direction with s = 0
    adds z_i^2 to the residual whatever alpha and beta are, which is where they end up, through
    the complement term ||Y||^2 - ||z||^2, and log(alpha + beta s^2) = log alpha, which is where
    they end up through the (D - k) log alpha term.
    """
    n, d = F.shape
    eps = np.finfo(np.float64).eps
    if n <= d:
        lam, U = np.linalg.eigh(F @ F.T)
        keep = lam > max(n, d) * eps * max(float(lam.max()), 0.0)
        s2 = lam[keep]
        z = U[:, keep].T @ Y
    else:
        lam, V = np.linalg.eigh(F.T @ F)
        keep = lam > max(n, d) * eps * max(float(lam.max()), 0.0)
        s2 = lam[keep]
        z = (V[:, keep].T @ (F.T @ Y)) / np.sqrt(s2)[:, None]  # U^T Y = diag(1/s) V^T F^T Y
    res_perp = np.clip(np.sum(Y * Y, axis=0) - np.sum(z * z, axis=0), 0.0, None)
    return s2, z, res_perp


def logme_fit(features: Any, labels: Any) -> LogMEResult:
    """LogME with its per-class optimum (see module doc). features (N, D), labels (N,) ints."""
    F = _as_float64(features, "features", 2)
    n, d = F.shape
    codes, n_classes = _as_labels(labels, n)
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), codes] = 1.0

    s2, z, res_perp = _svd_projection(F, Y)
    s = np.sqrt(s2)
    tiny = np.finfo(np.float64).tiny

    alpha = np.ones(n_classes)
    beta = np.ones(n_classes)
    ev = _evidence_svd(s2, z, res_perp, n, d, alpha, beta) / n
    active = np.arange(n_classes)  # classes still iterating
    it = 0
    while active.size and it < _MAX_ITER:
        it += 1
        a, b, za = alpha[active], beta[active], z[:, active]
        denom = a[None, :] + b[None, :] * s2[:, None]  # (k, K_active)
        gamma = np.sum(b[None, :] * s2[:, None] / denom, axis=0)
        mtm = np.sum((b[None, :] * s[:, None] * za / denom) ** 2, axis=0)
        res = np.sum((a[None, :] * za / denom) ** 2, axis=0) + res_perp[active]
        new_a = np.clip(gamma / np.maximum(mtm, tiny), 1e-300, 1e300)
        new_b = np.clip(np.maximum(n - gamma, tiny) / np.maximum(res, tiny), 1e-300, 1e300)
        step = np.maximum(np.abs(new_a - a) / a, np.abs(new_b - b) / b)
        new_ev = _evidence_svd(s2, za, res_perp[active], n, d, new_a, new_b) / n
        # done: the parameters stopped moving, or the evidence did (a maximum at the boundary
        # alpha -> inf, i.e. no feature direction helps this class, is approached slowly)
        ev_tol = _EV_TOL * np.maximum(1.0, np.abs(new_ev))
        done = (step < _RTOL) | (np.abs(new_ev - ev[active]) < ev_tol)
        alpha[active], beta[active], ev[active] = new_a, new_b, new_ev
        active = active[~done]
    converged = active.size == 0

    evidence = _evidence_svd(s2, z, res_perp, n, d, alpha, beta) / n
    return LogMEResult(
        score=float(np.mean(evidence)),
        alpha=alpha,
        beta=beta,
        evidence=evidence,
        iterations=it,
        converged=converged,
    )


def logme(features: Any, labels: Any) -> float:
    """LogME score of `features` (N, D) for target `labels` (N,): higher = more transferable."""
    return logme_fit(features, labels).score
