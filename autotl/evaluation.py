"""Metrics of a fitted model (or an ensemble) on a list of samples, read through the activation caches."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import Sample
from .train import classification_metrics, confusion_matrix


def metrics_of(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, *, confusion: bool = True) -> dict[str, Any]:
    """accuracy, macro-F1, loss, ``n`` (+ the confusion matrix) of ``logits`` against ``labels``."""
    m = classification_metrics(logits, labels, num_classes)
    m["n"] = int(len(labels))
    if confusion:
        m["confusion"] = confusion_matrix(logits, labels, num_classes)
    return m


def evaluate(fitted, samples: Sequence[Sample], num_classes: int, *, confusion: bool = True) -> dict[str, Any]:
    """Metrics of a ``autotl.fitted.Fitted`` on ``samples``; {} when empty."""
    if not samples:
        return {}
    labels = torch.tensor([s.label for s in samples], dtype=torch.long)
    return metrics_of(fitted.logits(samples), labels, num_classes, confusion=confusion)


def evaluate_ensemble(members, samples: Sequence[Sample], num_classes: int, *, confusion: bool = True) -> dict[str, Any]:
    """``evaluate`` for an ensemble (``autotl.ensemble.EnsembleMember`` list), as its graph computes it."""
    from .ensemble import ensemble_logits

    if not samples:
        return {}
    logits, labels = ensemble_logits(members, samples)
    return metrics_of(logits, labels, num_classes, confusion=confusion)
