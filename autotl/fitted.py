"""A trained classifier as the rest of a run sees it: the module to export, and the same computation
read through the run's activation caches (for metrics, ensembles and the int8 gate)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .data import Sample
from .models import SourceModel


@dataclass
class Fitted:
    """``net`` takes images preprocessed as ``source.data_config`` and returns logits; ``logits(samples)``
    gives what ``net`` would, from cached activations. ``training`` is the card's "training" entry."""

    net: nn.Module
    source: SourceModel
    training: dict[str, Any]
    logits_fn: Callable[[list[Sample]], torch.Tensor]
    history: list = field(default_factory=list)  # per-epoch metrics of a trained net; empty for a solved probe
    # a solved probe's model and the run's extractors (an ensemble merges its probes into one graph)
    probe: Any = None
    extractors: dict[str, Any] | None = None

    def logits(self, samples: Sequence[Sample]) -> torch.Tensor:
        samples = list(samples)
        if not samples:
            return torch.zeros(0, self.num_classes)
        return self.logits_fn(samples)

    @property
    def num_classes(self) -> int:
        return int(self.training.get("num_classes") or 0)


def fitted_from_training(result, source: SourceModel, extractor, num_classes: int) -> Fitted:
    """A net trained by ``autotl.train.train_model`` (``result``: its ``TrainResult``)."""
    from .train import predict_logits

    net = result.net

    def logits(samples: list[Sample]) -> torch.Tensor:
        return predict_logits(net, extractor.extract(samples, [net.frozen], description="eval features"))

    training = {**result.config.to_dict(), "kind": "probe (trained)" if net.frozen >= net.num_stages else "fine-tune",
                "frozen_stages": net.frozen, "num_stages": net.num_stages, "stage_names": net.stage_names,
                "best_epoch": result.best_epoch, "cached_prefix": result.cached, "n_train": result.n_train,
                "num_classes": int(num_classes)}
    return Fitted(net, source, training, logits, list(result.history))


def fitted_probe(model, extractors: dict[str, Any], source: SourceModel) -> Fitted:
    """A probe solved on cached features (``autotl.probe.ProbeModel``)."""
    primary = extractors[model.spec.models[0]]
    training = {"kind": "probe (solved)", "frozen_stages": primary.num_stages, "num_stages": primary.num_stages,
                "stage_names": [n for n, _ in primary.stages], "features": model.spec.to_json(),
                "feature_dim": int(model.weight.shape[1]), "l2": model.lam, "heads": int(model.weight.shape[0]),
                "solver": "Newton-CG on the span of the training rows (autotl.probe)", "best_epoch": None,
                "cached_prefix": True, "n_train": model.n_train, "num_classes": int(model.weight.shape[-1])}
    return Fitted(model.net(extractors), source, training, lambda samples: model.logits(extractors, samples),
                  probe=model, extractors=extractors)
