"""Metrics of a trained net on a list of samples, read through the activation cache."""

from __future__ import annotations

from typing import Any, Sequence

from .data import Sample
from .train import classification_metrics, confusion_matrix, predict_logits


def evaluate(net, extractor, samples: Sequence[Sample], num_classes: int, *, confusion: bool = True) -> dict[str, Any]:
    """accuracy, macro-F1, loss (+ ``n`` and the confusion matrix) of ``net`` on ``samples``; {} when empty."""
    if not samples:
        return {}
    acts = extractor.extract(list(samples), [net.frozen], description="eval features")
    logits = predict_logits(net, acts)
    m = classification_metrics(logits, acts.labels, num_classes)
    m["n"] = len(samples)
    if confusion:
        m["confusion"] = confusion_matrix(logits, acts.labels, num_classes)
    return m


def evaluate_ensemble(members, samples: Sequence[Sample], num_classes: int, *, confusion: bool = True) -> dict[str, Any]:
    """``evaluate`` for an ensemble (``autotl.ensemble.EnsembleMember`` list), as its graph computes it."""
    from .ensemble import ensemble_logits

    if not samples:
        return {}
    logits, labels = ensemble_logits(members, samples)
    m = classification_metrics(logits, labels, num_classes)
    m["n"] = len(samples)
    if confusion:
        m["confusion"] = confusion_matrix(logits, labels, num_classes)
    return m
