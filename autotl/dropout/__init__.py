"""Influence-function data dropout (Wang, Huan & Zhu, *Instance-based Deep Transfer Learning*).

Fit a convex softmax head on cached frozen-backbone features, score every training image by the
predicted reduction of the total validation loss if it were removed (``influence_scores``), then
drop the harmful ones with a scale-free threshold (``select_dropout``)::

    head = fit_logistic_head(train_x, train_y, num_classes, l2=1e-3)
    result = influence_scores(head, train_x, train_y, val_x, val_y)
    keep, report = select_dropout(result.scores, tau=2.0, labels=train_y)
"""

from .influence import InfluenceResult, LinearHead, fit_logistic_head, influence_scores
from .selection import DropoutReport, robust_spread, select_dropout

__all__ = [
    "DropoutReport",
    "InfluenceResult",
    "LinearHead",
    "fit_logistic_head",
    "influence_scores",
    "robust_spread",
    "select_dropout",
]
