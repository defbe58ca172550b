"""Transferability estimates for a source model, the maths behind ``autotl.score``: DATL weights and metrics.

All functions take arrays from one feature pass over the target images (numpy or torch) and
compute in float64:

- `datl_weights(softmax(source_logits), prior)` -> `DatlWeights` (P_t, P_s, w = P_t / P_s,
  KL(P_t || P_s) relevance score, `top_mass(k)`, `top_classes(k, names)`); a prior from
  `load_prior(path, class_names)` (class counts), else uniform.
- `logme(features, labels)`, `leep(softmax(source_logits), labels)`,
  `hscore(features, labels, shrinkage=True)`: higher = more transferable.
- `kendall_tau(a, b)`, `combine_ranks(table, metrics)`: compare / combine rankings.
"""

from __future__ import annotations

from ._rank import combine_ranks, kendall_tau
from .datl import DatlWeights, datl_weights, load_prior, softmax
from .hscore import hscore, ledoit_wolf_shrinkage
from .leep import leep
from .logme import LogMEResult, log_evidence, logme, logme_fit

__all__ = [
    "DatlWeights",
    "datl_weights",
    "softmax",
    "load_prior",
    "logme",
    "logme_fit",
    "log_evidence",
    "LogMEResult",
    "leep",
    "hscore",
    "ledoit_wolf_shrinkage",
    "kendall_tau",
    "combine_ranks",
]
