"""LEEP: Log Expected Empirical Prediction (Nguyen et al., ICML 2020, "LEEP: A New Measure to
Evaluate Transferability of Learned Representations").

With theta(x) in the source-label simplex (source-head softmax) and target labels y_i:

    P(y, z)  = (1/N) sum_i theta(x_i)_z 1[y_i = y]        empirical joint, (K, C_s)
    P(z)     = sum_y P(y, z)                                 (C_s,)
    P(y | z) = P(y, z) / P(z)
    LEEP     = (1/N) sum_i log( sum_z P(y_i | z) theta(x_i)_z ).

LEEP <= 0 (each term is the log of a probability); higher = more transferable. It is the mean
log-likelihood of the "expected empirical predictor" that re-labels source classes into target
classes, so it needs the source head, unlike LogME and H-score.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._rank import _as_float64, _as_labels, _check_probs

__all__ = ["leep"]


def leep(source_probs: Any, labels: Any) -> float:
    """LEEP of source-head probabilities `source_probs` (N, C_s) for target `labels` (N,)."""
    theta = _as_float64(source_probs, "source_probs", 2)
    _check_probs(theta, "source_probs")
    theta = np.clip(theta, 0.0, None)
    n = theta.shape[0]
    codes, n_classes = _as_labels(labels, n)
    Y = np.zeros((n, n_classes))
    Y[np.arange(n), codes] = 1.0

    joint = (Y.T @ theta) / n  # (K, C_s)
    p_z = joint.sum(axis=0)  # (C_s,)
    # a source class no target image puts mass on has theta_z = 0 everywhere: it contributes 0
    cond = np.divide(joint, p_z[None, :], out=np.zeros_like(joint), where=p_z[None, :] > 0)
    eep = np.einsum("nc,nc->n", theta, cond[codes])  # sum_z P(y_i|z) theta_iz, (N,)
    eep = np.clip(eep, np.finfo(np.float64).tiny, 1.0)
    return float(np.mean(np.log(eep)))
