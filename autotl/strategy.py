"""Transfer strategies that change *what* a trial trains on or *how* (extension point).

A strategy (data dropout, selective joint fine-tuning, ...) reads its parameters from the trial's
parameter dict (the recipe declares their ranges), and before training may replace the training
samples (``ctx.train_samples``), set the feature layout a probe reads (``ctx.features``) and how it
picks its penalty (``ctx.choose_penalty``) or add ``autotl.train.TrainingHooks`` to the one
training loop (``ctx.hooks``): every strategy trains
through ``train_strategy``. Adding one is one new module with a ``BaseStrategy`` subclass plus one
``STRATEGIES.register`` line (name, ``"module:Class"``, order) and its dimensions in the recipes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._memory import BoundedMemory
from ._registry import Registry
from .data import DatasetIndex, Sample
from .features import FeatureExtractor
from .models import SourceModel
from . import train as _train
from .train import TrainConfig, TrainingHooks, TrainResult


@dataclass
class StrategyContext:
    """Everything a strategy may read or change for one training run (a trial or the final fit)."""

    index: DatasetIndex
    source: SourceModel
    extractor: FeatureExtractor
    run_dir: Path
    config: TrainConfig
    train_samples: list[Sample]
    hooks: list[TrainingHooks] = field(default_factory=list)  # added by strategies, run in their order
    options: dict[str, Any] = field(default_factory=dict)  # run-wide options (e.g. source_pool, focus_class)
    notes: dict[str, Any] = field(default_factory=dict)  # what each strategy did, for the card and report
    final: bool = False  # True for the final refit: strategies write their artefacts (csv files)
    # The images that may *decide* something inside this training run (data dropout's influence
    # reference; early stopping gets the same list from the caller). A cross-validated trial gives its
    # fold's decision part, never the images that score it; None = the val split.
    reference: list[Sample] | None = None
    reference_name: str = "val split"
    # the run's candidate models in ranked order, and the feature layout a linear probe reads
    # (set by the ``features`` strategy; None: the source model's pooled features)
    candidates: list[str] = field(default_factory=list)
    features: Any = None
    # how a probe trial picks its L2 penalty on the path (set by a strategy): ``(lambdas, fold_losses
    # [penalty][fold], oof_losses [penalty]) -> index``; None: the least out-of-fold log loss
    choose_penalty: Any = None
    # what strategies keep between trainings (influence outcomes, pool descriptors): the run's memory,
    # so the trials of a search share it and nothing outlives the run; a context of its own otherwise
    memory: BoundedMemory = field(default_factory=BoundedMemory)

    def __post_init__(self) -> None:
        if self.reference is None:
            self.reference = list(self.index.val)
        if not self.candidates:
            self.candidates = [self.source.label]


class BaseStrategy(ABC):
    """One transfer strategy. Subclasses set ``name`` and ``params`` and implement ``is_active`` and
    ``apply``; they are built without arguments (``create_strategy``)."""

    name: str = "base"
    params: tuple[str, ...] = ()  # keys of the trial parameters this strategy consumes

    @abstractmethod
    def is_active(self, params: dict[str, Any]) -> bool:
        """Whether the parameters switch this strategy on (e.g. retrieval_k > 0)."""

    @abstractmethod
    def apply(self, ctx: StrategyContext, params: dict[str, Any]) -> None:
        """Change ``ctx`` in place before training; record what was done in ``ctx.notes[self.name]``."""

    def describe(self, params: dict[str, Any]) -> str:
        """The strategy in words, for the leaderboard and the card."""
        return f"{self.name}: " + ", ".join(f"{k}={params[k]}" for k in self.params if k in params)


# One line per strategy. The order is the order of application: data dropout first, because it
# decides which training images are kept and retrieval looks up pool neighbours for the kept ones
# (``ctx.train_samples``) and wraps training in the joint trainer.
STRATEGIES: Registry[BaseStrategy] = Registry("strategy", BaseStrategy)
STRATEGIES.register("features", "autotl.probe:ProbeFeatures", order=5)
STRATEGIES.register("dropout", "autotl.dropout.strategy:DataDropout", order=10)
STRATEGIES.register("retrieval", "autotl.retrieval.strategy:SelectiveJointFineTuning", order=20)
STRATEGIES.register("lpft", "autotl.finetune:ProbeStartedFineTuning", order=30)


def list_strategies() -> list[str]:
    """Registered strategy names, in the order they are applied."""
    return STRATEGIES.names()


def create_strategy(name: str) -> BaseStrategy:
    """The strategy registered as ``name``; an unknown name raises ``UnknownNameError`` (a ValueError)."""
    return STRATEGIES.create(name)


def create_strategies(names: list[str] | None = None) -> list[BaseStrategy]:
    """The named strategies (all when ``names`` is None), in the order they are applied."""
    wanted = None if names is None else {STRATEGIES.key(n) for n in names}  # unknown names raise
    return [create_strategy(n) for n in STRATEGIES if wanted is None or n in wanted]


def strategy_params() -> set[str]:
    return {p for s in create_strategies() for p in s.params}


def train_strategy(ctx: StrategyContext, val_samples, *, device=None, deadline: float | None = None,
                   on_epoch=None) -> TrainResult:
    """Train what the strategies made of ``ctx`` (its samples, config and hooks) in the one training loop,
    early-stopped (or not, per the config) on ``val_samples``."""
    return _train.train_model(ctx.source, ctx.train_samples, list(val_samples), len(ctx.index.classes), ctx.config,
                              extractor=ctx.extractor, device=device, deadline=deadline, on_epoch=on_epoch, hooks=ctx.hooks)


def apply_strategies(ctx: StrategyContext, params: dict[str, Any]) -> StrategyContext:
    """Apply every active strategy to ``ctx``, in registry order (see ``STRATEGIES``)."""
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
