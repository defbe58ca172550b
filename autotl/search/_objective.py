"""One trial: recipe parameters → strategies → ``train_model`` on the shared cache → val score."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DatasetIndex
from ..errors import AutotlError
from ..models import SourceModel
from ..strategy import StrategyContext, apply_strategies, config_from_params
from .. import train as _train
from ..train import TrainConfig, should_cache
from ._recipe import FROZEN, MODEL, Recipe, resolve_frozen_relative


class TrialFailed(Exception):
    """A trial raised (non-finite loss, out of memory, a strategy error): recorded FAIL, study goes on."""


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


@dataclass
class TrialSetup:
    """What a trial (or the final refit) trains: source, extractor, config, parameters by target."""

    params: dict[str, Any]
    source: SourceModel
    extractor: Any
    config: TrainConfig


@dataclass
class Objective:
    """The Optuna objective of a strategy search (callable on a trial, returns the val objective)."""

    index: DatasetIndex
    recipe: Recipe
    sources: dict[str, SourceModel]  # candidate label -> model
    extractors: dict[str, Any]  # candidate label -> SharedActivations (one per source, all trials)
    base: TrainConfig
    run_dir: Path
    device: torch.device
    options: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # fixed parameter values (fit's ``strategy=``)
    deadline: float | None = None  # time.monotonic(): trials stop at the first epoch past it
    started: list[int] = field(default_factory=list)  # trial numbers started by this process

    @property
    def candidates(self) -> list[str]:
        return list(self.sources)

    def setup(self, params: dict[str, Any]) -> TrialSetup:
        """Trial parameters (by target) → source, extractor and a TrainConfig (frozen resolved)."""
        label = params.get(MODEL, self.candidates[0])
        if label not in self.sources:
            raise AutotlError(f"model {label!r} of this study is not among the candidates ({', '.join(self.candidates)}); "
                              "resume with the same --model list")
        extractor = self.extractors[label]
        cfg = config_from_params(params, self.base)
        cfg.frozen_stages = resolve_frozen_relative(params.get(FROZEN, self.base.frozen_stages), extractor.num_stages)
        cfg.objective = self.base.objective
        return TrialSetup(params, self.sources[label], extractor, cfg)

    def __call__(self, trial) -> float:
        import optuna

        self.started.append(trial.number)
        t0 = time.monotonic()
        objective = self.base.objective
        setup = None
        fb0 = sum(e.forward_batches for e in self.extractors.values())
        status = "error"
        try:
            params = {**self.fixed, **self.recipe.sample(trial, self.candidates)}
            setup = self.setup(params)
            trial.set_user_attr("frozen", setup.config.frozen_stages)
            trial.set_user_attr("num_stages", setup.extractor.num_stages)
            trial.set_user_attr("cached", should_cache(setup.extractor, len(self.index.train) + len(self.index.val),
                                                       setup.config.frozen_stages, setup.config.use_cache))
            ctx = StrategyContext(self.index, setup.source, setup.extractor, self.run_dir, setup.config,
                                  list(self.index.train), train_fn=_train.train_model, options=dict(self.options), final=False)
            apply_strategies(ctx, params)

            def on_epoch(m) -> None:
                trial.report(m.score(objective), m.epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"epoch {m.epoch}: {objective} {m.score(objective):.4f} below the pruner's bar")

            result = ctx.train_fn(setup.source, ctx.train_samples, self.index.val, len(self.index.classes), ctx.config,
                                  extractor=setup.extractor, device=self.device, on_epoch=on_epoch, deadline=self.deadline)
            best = result.best
            value = best.score(objective)
            if not math.isfinite(value):
                raise FloatingPointError(f"validation {objective} is {value}")
            for k, v in {"accuracy": best.accuracy, "macro_f1": best.macro_f1, "val_loss": best.val_loss,
                         "best_epoch": result.best_epoch, "epochs_run": len(result.history), "cached": result.cached,
                         "n_train": result.n_train, "strategies": _jsonable(ctx.notes)}.items():
                trial.set_user_attr(k, _jsonable(v))
            status = "ok"
            return value
        except optuna.TrialPruned:
            status = "pruned"
            raise
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        except AutotlError:
            raise  # the user's input is wrong: stop the study with the message
        except Exception as exc:  # noqa: BLE001 - recorded on the trial; the study goes on
            trial.set_user_attr("error", f"{type(exc).__name__}: {str(exc)[:400]}")
            raise TrialFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            _safe_attrs(trial, {
                "seconds": round(time.monotonic() - t0, 3),
                "forward_batches": sum(e.forward_batches for e in self.extractors.values()) - fb0,
                "interrupted": status == "interrupted",
            })


def _safe_attrs(trial, attrs: dict[str, Any]) -> None:
    """Best effort: a second Ctrl-C or a storage hiccup here must not hide the original outcome."""
    try:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
    except BaseException:  # noqa: BLE001
        pass
