"""Influence-function data dropout (Wang, Huan & Zhu, *Instance-based Deep Transfer Learning*).

Fit a convex softmax head on cached frozen-backbone features, score every training image by the
predicted reduction of the total validation loss if it were removed (``influence_scores``), then
drop the harmful ones with a scale-free threshold (``select_dropout``)::

    head = fit_logistic_head(train_x, train_y, num_classes, l2=1e-3)
    result = influence_scores(head, train_x, train_y, val_x, val_y)
    keep, report = select_dropout(result.scores, tau=2.0, labels=train_y)

Through the last trainable block as well (``block_influence_scores``: CG with Hessian-vector
products on block + head).  As a transfer strategy: ``DataDropout`` (trial parameters ``dropout_tau``,
``dropout_mode``, ``dropout_influence``); the dry
run without training: ``inspect_dropout(data_dir, tau=...)`` / ``autotl dropout DIR``.
"""

from importlib import import_module as _import_module
from typing import Any as _Any

# Lazy, so that importing ``autotl.dropout`` does not import torch.
_LAZY = {
    "InfluenceResult": "influence",
    "LinearHead": "influence",
    "fit_logistic_head": "influence",
    "influence_scores": "influence",
    "block_influence_scores": "block_influence",
    "DropoutReport": "selection",
    "robust_spread": "selection",
    "select_dropout": "selection",
    "DataDropout": "strategy",
    "compute_influence": "strategy",
    "DropoutInspection": "dryrun",
    "inspect_dropout": "dryrun",
}

__all__ = [
    "DataDropout",
    "DropoutInspection",
    "DropoutReport",
    "InfluenceResult",
    "LinearHead",
    "block_influence_scores",
    "compute_influence",
    "fit_logistic_head",
    "influence_scores",
    "inspect_dropout",
    "robust_spread",
    "select_dropout",
]


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autotl.dropout' has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
