"""Transfer-learning regularisers of the strategy search.

- ``BaseRegularizer`` (extension point), ``NoRegularizer``
- ``L2SP``: α/2‖ω_S − ω_S⁰‖² + β/2‖ω_new‖² with a closed-form gradient
- ``FeatureMapKD``: feature-map distillation against the frozen source network ("KnowDist")
- ``regularized_backward``: ∇J + λ∇Ω, or the DTNH direction (projection of ∇Ω when it conflicts with ∇J)
- ``CoefficientSchedule``: per-epoch decay λ_e = λ0·decay^e

Adding a regulariser: a ``BaseRegularizer`` subclass (with ``from_config``) in a new module + one
``REGULARIZERS.register`` line in ``base.py``.
"""

from __future__ import annotations

from .base import (
    REGULARIZERS,
    BaseRegularizer,
    NoRegularizer,
    create_regularizer,
    list_regularizers,
    regularizer_from_config,
    turns_off_weight_decay,
)
from .dtnh import CoefficientSchedule, StepStats, dtnh_direction, regularized_backward
from .kd import FeatureMapKD
from .l2sp import L2SP

__all__ = [
    "BaseRegularizer",
    "NoRegularizer",
    "L2SP",
    "FeatureMapKD",
    "StepStats",
    "CoefficientSchedule",
    "regularized_backward",
    "dtnh_direction",
    "REGULARIZERS",
    "create_regularizer",
    "list_regularizers",
    "regularizer_from_config",
    "turns_off_weight_decay",
]
