"""H-score (Bao et al., ICIP 2019, "An Information-theoretic Approach to Transferability in Task
Transfer Learning") and its shrinkage-based version (Ibrahim, Ponomareva & Mazumder, NeurIPS
2022, "Newer is not always better: Rethinking transferability metrics, their peculiarities,
stability and performance").

    H(f)       = tr( cov(f)^-1 cov(E[f | y]) )
    H_alpha(f) = tr( cov_alpha(f)^-1 (1 - alpha) cov(E[f | y]) ),
    cov_alpha  = (1 - alpha) S + alpha mu I,   mu = tr(S) / D,

where E[f | y] replaces each feature vector by its class mean, S is the empirical feature
covariance and alpha the Ledoit-Wolf shrinkage coefficient (Ledoit & Wolf 2004, "A
well-conditioned estimator for large-dimensional covariance matrices"), computed in closed form
from the centred features X (N, D):

    delta^2 = ||S - mu I||_F^2 / D
    b^2     = min( (1/N^2) sum_n ||x_n x_n^T - S||_F^2 / D,  delta^2 )
            with sum_n ||x_n x_n^T - S||_F^2 = sum_n ||x_n||^4 - N ||S||_F^2
    alpha   = b^2 / delta^2              (0 when delta^2 = 0)

(the same estimator as sklearn.covariance.ledoit_wolf). Both covariances use the 1/N
normalisation, consistently; common public implementations mix 1/N (Ledoit-Wolf) with 1/(N-1)
(np.cov for the class means), which scales H_alpha by N/(N-1) relative to this one - no effect on
rankings. The plain H-score uses a pseudo-inverse (cov(f) is singular when N <= D); the
shrinkage version is recommended: it is well-conditioned and far less sensitive to D and N.
Higher is better for both; H <= D (at most min(D, K - 1) for K classes).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._rank import _as_float64, _as_labels

__all__ = ["hscore", "ledoit_wolf_shrinkage"]


def ledoit_wolf_shrinkage(X: Any) -> tuple[float, np.ndarray]:
    """(alpha, shrunk covariance) of the Ledoit-Wolf estimator for samples X (N, D).

    X is centred here; the empirical covariance uses 1/N.
    """
    X = _as_float64(X, "X", 2)
    n, d = X.shape
    Xc = X - X.mean(axis=0, keepdims=True)
    S = (Xc.T @ Xc) / n
    mu = float(np.trace(S)) / d
    s_fro2 = float(np.sum(S * S))
    delta2 = (s_fro2 - 2.0 * mu * float(np.trace(S)) + d * mu * mu) / d  # ||S - mu I||_F^2 / D
    row_norm2 = np.einsum("nd,nd->n", Xc, Xc)
    b2_bar = (float(np.sum(row_norm2 * row_norm2)) / n - s_fro2) / (n * d)
    b2 = min(max(b2_bar, 0.0), delta2)
    alpha = 0.0 if delta2 <= 0.0 else b2 / delta2
    shrunk = (1.0 - alpha) * S
    shrunk.flat[:: d + 1] += alpha * mu
    return alpha, shrunk


def _trace_inv_product(C: np.ndarray, M: np.ndarray) -> float:
    """tr(C^+ M^T M) for symmetric PSD C (D, D) and M (K, D), via eigh with a rank cut-off."""
    lam, Q = np.linalg.eigh(C)
    cutoff = max(C.shape) * np.finfo(np.float64).eps * max(float(lam.max()), 0.0)
    keep = lam > cutoff
    if not keep.any():
        return 0.0
    P = M @ Q[:, keep]  # (K, r)
    return float(np.sum(P * P / lam[keep][None, :]))


def hscore(features: Any, labels: Any, shrinkage: bool = True) -> float:
    """H-score of `features` (N, D) for target `labels` (N,); higher = more transferable.

    shrinkage=True (default): shrinkage-based H_alpha with the Ledoit-Wolf coefficient;
    shrinkage=False: original H-score with a pseudo-inverse of the empirical covariance.
    """
    F = _as_float64(features, "features", 2)
    n, d = F.shape
    codes, n_classes = _as_labels(labels, n)
    mean = F.mean(axis=0)
    onehot = np.zeros((n, n_classes))
    onehot[np.arange(n), codes] = 1.0
    counts = onehot.sum(axis=0)
    class_means = (onehot.T @ F) / counts[:, None]  # (K, D)
    # cov(E[f|y]) = sum_k (n_k / N) (mu_k - mu)(mu_k - mu)^T = M^T M
    M = np.sqrt(counts / n)[:, None] * (class_means - mean[None, :])  # (K, D)

    if shrinkage:
        alpha, cov_f = ledoit_wolf_shrinkage(F)
        if alpha > 0.0:  # shrunk covariance is positive definite: a linear solve is enough
            try:
                return (1.0 - alpha) * float(np.sum(M.T * np.linalg.solve(cov_f, M.T)))
            except np.linalg.LinAlgError:
                pass
        return (1.0 - alpha) * _trace_inv_product(cov_f, M)
    Fc = F - mean[None, :]
    cov_f = (Fc.T @ Fc) / n
    return _trace_inv_product(cov_f, M)
