"""Transfer-learning regularisers of the strategy search (issue 4).

- ``BaseRegularizer`` (extension point), ``NoRegularizer``
- ``L2SP``: α/2‖ω_S − ω_S⁰‖² + β/2‖ω_new‖² with a closed-form gradient
- ``FeatureMapKD``: feature-map distillation against the frozen source network ("KnowDist")
- ``regularized_backward``: ∇J + λ∇Ω, or the DTNH direction (projection of ∇Ω when it conflicts with ∇J)
- ``CoefficientSchedule``: per-epoch decay λ_e = λ0·decay^e

Adding a regulariser: a ``BaseRegularizer`` subclass in a new module + one line in ``_REGISTRY``.
"""

from __future__ import annotations

from typing import Any

from .base import BaseRegularizer, NoRegularizer
from .dtnh import CoefficientSchedule, StepStats, dtnh_direction, regularized_backward
from .kd import FeatureMapKD
from .l2sp import L2SP

_REGISTRY: dict[str, type[BaseRegularizer]] = {
    "none": NoRegularizer,
    "l2sp": L2SP,
    "kd": FeatureMapKD,
}


def available_regularizers() -> list[str]:
    return sorted(_REGISTRY)


def create_regularizer(name: str, **kwargs: Any) -> BaseRegularizer:
    """Build a regulariser by registry name ("none", "l2sp", "kd") with its constructor kwargs."""
    key = str(name).strip().lower()
    try:
        cls = _REGISTRY[key]
    except KeyError:
        raise ValueError(f"unknown regularizer {name!r}; available: {', '.join(available_regularizers())}") from None
    return cls(**kwargs)


__all__ = [
    "BaseRegularizer",
    "NoRegularizer",
    "L2SP",
    "FeatureMapKD",
    "StepStats",
    "CoefficientSchedule",
    "regularized_backward",
    "dtnh_direction",
    "create_regularizer",
    "available_regularizers",
]
