"""Transfer strategies that change *what* a trial trains on or *how* (extension point).

A strategy (data dropout, selective joint fine-tuning, ...) reads its parameters from the trial's
parameter dict (the recipe declares their ranges), and before training may replace the training
samples (``ctx.train_samples``) or the training function (``ctx.train_fn``, same signature as
``autotl.train.train_model``). Adding one is one new module with a ``BaseStrategy`` subclass plus
one line in ``STRATEGIES`` and its dimensions in the recipes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .data import DatasetIndex, Sample
from .features import FeatureExtractor
from .models import SourceModel
from .train import TrainConfig, train_model


@dataclass
class StrategyContext:
    """Everything a strategy may read or change for one training run (a trial or the final fit)."""

    index: DatasetIndex
    source: SourceModel
    extractor: FeatureExtractor
    run_dir: Path
    config: TrainConfig
    train_samples: list[Sample]
    train_fn: Callable[..., Any] = train_model
    options: dict[str, Any] = field(default_factory=dict)  # run-wide options (e.g. source_pool, focus_class)
    notes: dict[str, Any] = field(default_factory=dict)  # what each strategy did, for the card and report
    final: bool = False  # True for the final refit: strategies write their artefacts (csv files)


class BaseStrategy:
    """One transfer strategy. Subclasses set ``name`` and ``params`` and implement ``apply``."""

    name: str = "base"
    params: tuple[str, ...] = ()  # keys of the trial parameters this strategy consumes

    def is_active(self, params: dict[str, Any]) -> bool:
        """Whether the parameters switch this strategy on (e.g. retrieval_k > 0)."""
        raise NotImplementedError

    def apply(self, ctx: StrategyContext, params: dict[str, Any]) -> None:
        """Change ``ctx`` in place before training; record what was done in ``ctx.notes[self.name]``."""
        raise NotImplementedError

    def describe(self, params: dict[str, Any]) -> str:
        """The strategy in words, for the leaderboard and the card."""
        return f"{self.name}: " + ", ".join(f"{k}={params[k]}" for k in self.params if k in params)


# name -> "module:Class"; one line per strategy.
STRATEGIES: dict[str, str] = {
    "dropout": "autotl.dropout.strategy:DataDropout",
    "retrieval": "autotl.retrieval.strategy:SelectiveJointFineTuning",
}


def create_strategies(names: list[str] | None = None) -> list[BaseStrategy]:
    out = []
    for name, target in STRATEGIES.items():
        if names is None or name in names:
            module, cls = target.split(":")
            out.append(getattr(importlib.import_module(module), cls)())
    return out


def strategy_params() -> set[str]:
    return {p for s in create_strategies() for p in s.params}


def apply_strategies(ctx: StrategyContext, params: dict[str, Any]) -> StrategyContext:
    for strategy in create_strategies():
        if strategy.is_active(params):
            strategy.apply(ctx, params)
    return ctx


def config_from_params(params: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """A TrainConfig with every field named in ``params`` overridden (strategy keys are ignored)."""
    base = base or TrainConfig()
    fields = set(TrainConfig.__dataclass_fields__)
    values = {**base.to_dict(), **{k: v for k, v in params.items() if k in fields}}
    return TrainConfig(**values)
