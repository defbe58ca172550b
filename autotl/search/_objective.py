"""One trial: recipe parameters → strategies → ``train_model`` per fold on the shared cache → mean score."""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import DatasetIndex
from ..errors import AutotlError
from ..ensemble import encode_probs
from ..finetune import refit_values
from ..run import Run
from ..models import SourceModel
from ..strategy import StrategyContext, apply_strategies, config_from_params, train_strategy
from ..train import TrainConfig, classification_metrics, predict_logits, should_cache
from ._distributed import OVER_BUDGET
from ._folds import Fold, Selection
from ._oof import OutOfFold
from .._recipe import FROZEN, MODEL, Recipe, resolve_frozen_relative


OOF_MAX_VALUES = 2_000_000  # out-of-fold probabilities kept per trial up to this many (8 MB in the storage)


def score_fold(net, extractor, samples, num_classes: int) -> tuple[dict[str, float], torch.Tensor]:
    """(metrics, logits) of a fold's trained net on the fold's scoring part."""
    acts = extractor.extract(list(samples), [net.frozen], description="eval features")
    logits = predict_logits(net, acts)
    return classification_metrics(logits, acts.labels, num_classes), logits


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
    """The Optuna objective of a strategy search: a trial's cross-validated score (see ``_folds``).

    Every fold trains the trial's strategy on its training part, early-stops it (and takes the data
    dropout reference) on its decision part, and scores it on its scoring part, which decided
    nothing. The trial's value is the mean over folds; its standard error, the per-fold scores and
    best epochs, and the (optimistic) decision-part score go to the trial's user attributes.
    """

    run: Run
    recipe: Recipe
    base: TrainConfig
    selection: Selection
    options: dict[str, Any] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)  # fixed parameter values (fit's ``strategy=``)
    deadline: float | None = None  # time.monotonic(): the budget; set by run_study
    budget: float | None = None  # seconds of the whole search (set by run_study)
    overrun_s: float = 30.0  # a trial started in budget stops this long past it (its score is then dropped)
    cost_ratios: list[float] = field(default_factory=list)  # measured / estimated seconds of trained trials (first fold)
    started: list[int] = field(default_factory=list)  # trial numbers started by this process
    cost: Any = None  # ``_cost.CostModel``: a trial that cannot finish in the time left is not started
    best_probe: tuple[float, float] = (float("-inf"), 0.0)  # (value, penalty) of the best probe trial so far
    _cheapest_s: float | None = None  # the cheapest trial the recipe allows (the cost model's, fixed for the run)

    @property
    def candidates(self) -> list[str]:
        return self.run.labels

    @property
    def index(self) -> DatasetIndex:
        return self.run.index

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def device(self) -> torch.device:
        return self.run.device

    def setup(self, params: dict[str, Any]) -> TrialSetup:
        """Trial parameters (by target) → source, extractor and a TrainConfig (frozen resolved). A probe
        over several backbones is set up on the first of them (the others are read from the table)."""
        from ..probe import parse_backbones

        label = (parse_backbones(params["backbones"], self.candidates)[0] if params.get("backbones")
                 else params.get(MODEL, self.candidates[0]))
        if label not in self.run.sources:
            raise AutotlError(f"model {label!r} of this study is not among the candidates ({', '.join(self.candidates)}); "
                              "resume with the same --model list")
        extractor = self.run.extractors[label]
        cfg = config_from_params(params, self.base)
        cfg.frozen_stages = resolve_frozen_relative(params.get(FROZEN, self.base.frozen_stages), extractor.num_stages)
        cfg.objective = self.base.objective
        return TrialSetup(params, self.run.sources[label], extractor, cfg)

    def probe_spec(self, params: dict[str, Any]):
        """The feature layout a probe trial with ``params`` reads (what the ``features`` strategy sets)."""
        from ..probe import FeatureSpec, parse_backbones

        return FeatureSpec(parse_backbones(params.get("backbones"), self.candidates), int(params.get("taps") or 0),
                           bool(params.get("flip")))

    def probe_dim(self, spec) -> int:
        """Width of ``spec``'s concatenated features (from the cached scoring pass)."""
        from ..probe import feature_blocks

        def widths(label: str) -> dict:
            acts = self.run.extractors[label].extract(list(self.index.train), description="train features")
            return {None: int(acts.pooled.shape[1]), **{c: int(t.shape[1]) for c, t in acts.taps.items()}}

        return sum(self.run.memory.get(("widths", label), lambda: widths(label))[cut]
                   for label, cut in feature_blocks(spec, self.run.extractors))

    def estimate_seconds(self, params: dict[str, Any], setup: TrialSetup) -> float:
        """The cost model's estimate of a trial with ``params`` (a solved probe or a trained trial)."""
        if solved_probe(setup):
            spec = self.probe_spec(params)
            return self.cost.probe_seconds(self.probe_dim(spec), len(spec.views)) + self.owed_pass_seconds(spec)
        return self.cost.trial_seconds(setup.source.label, setup.config, params, setup.extractor)

    def owed_pass_seconds(self, spec) -> float:
        """The frozen passes a probe trial with ``spec`` runs before it can solve: the views of its
        models not computed yet (the scoring pass computes every candidate's center view; a flipped
        view costs a whole forward of every labelled image)."""
        seconds = 0.0
        for label in spec.models:
            extractor = self.run.extractors[label]
            for view in spec.views:
                owed = sum(len(part) for part in (self.index.train, self.index.val)
                           if part and not extractor.cached(part, view))
                seconds += owed * (self.cost.forward.get(label, 0.0) + self.cost.decode)
        return seconds

    def probe_table(self):
        """The labelled images as probe rows, shared by every probe trial (and the refit) of the run."""
        from ._probe import ProbeTable

        labelled = list(self.index.train) + list(self.index.val)
        return self.run.memory.get(("probe-table", len(labelled)), lambda: ProbeTable(self.run, labelled))

    def train_fold(self, setup: TrialSetup, params: dict[str, Any], fold: Fold, *, deadline: float | None = None):
        """(TrainResult, strategy notes) of one fold: strategies see the fold's training and decision parts only."""
        ctx = StrategyContext(self.index, setup.source, setup.extractor, self.run_dir, copy.deepcopy(setup.config),
                              list(fold.train), options=dict(self.options), final=False,
                              reference=list(fold.decide), reference_name="fold's decision part",
                              candidates=list(self.candidates), memory=self.run.memory)
        apply_strategies(ctx, params)
        result = train_strategy(ctx, fold.decide, device=self.device, deadline=deadline)
        return result, ctx.notes

    def cost_scale(self) -> float:
        """Seconds this run's trained trials took per estimated second (their first folds; median, 1
        before any): the start-up cost model corrected by what trials measured on this device."""
        from ._cost import COST_SCALE_BOUNDS

        if not self.cost_ratios:
            return 1.0
        low, high = COST_SCALE_BOUNDS
        return min(high, max(low, statistics.median(self.cost_ratios)))

    def _check_time(self, trial, setup: TrialSetup, params: dict[str, Any]) -> tuple[float, bool]:
        """(the trial's estimated cost, whether it runs regardless of time); do not start the trial
        when it cannot finish before the deadline, and stop the study when nothing the recipe allows
        could. A portfolio entry runs whatever its estimate while no trial has completed (the
        cheapest one comes first: the study always has a result); the others are judged like any trial."""
        from optuna.trial import TrialState

        from ._cost import MAX_TRIAL_SHARE, cheapest_trial_seconds

        estimate = self.estimate_seconds(params, setup)
        trial.set_user_attr("estimated_seconds", round(estimate, 2))
        if self.deadline is None:
            return estimate, False
        if trial.user_attrs.get("baseline") and not trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return estimate, True
        scale = self.cost_scale()
        left = self.deadline - time.monotonic()
        # nor one that alone would take more than its share of the whole budget: one trial eating the
        # budget leaves nothing to compare it with (a small set's budget is a minute or two)
        allowed = min(left, MAX_TRIAL_SHARE * self.budget) if self.budget else left
        if scale * estimate <= allowed:
            return estimate, False
        if self._cheapest_s is None:
            self._cheapest_s = cheapest_trial_seconds(self.cost, self.recipe, self.base, self.run)
        cheapest = scale * self._cheapest_s
        raise _not_started(trial, scale * estimate, allowed, stop=cheapest > allowed)

    def _probe_trial(self, trial, params: dict[str, Any], setup: TrialSetup) -> float:
        """Every fold of a linear probe at once (``_probe``); the same attributes a trained trial stores."""
        from ._probe import cross_validate_probe, summary_attrs

        cv = cross_validate_probe(self, params, setup)
        value = statistics.fmean(cv.scores)
        if not math.isfinite(value):
            raise FloatingPointError(f"probe {self.base.objective} is {value}")
        if value > self.best_probe[0]:  # fine-tunes start from the head of the best probe so far (LP-FT)
            self.best_probe = (value, cv.lam)
            self.options["probe_l2"] = cv.lam
        for k, v in {**summary_attrs(cv, self.selection, self.base.objective), "strategies": _jsonable(cv.notes)}.items():
            trial.set_user_attr(k, _jsonable(v))
        if cv.oof[cv.chosen].size <= OOF_MAX_VALUES:
            trial.set_user_attr("oof", encode_probs(cv.oof[cv.chosen]))
        return value

    def __call__(self, trial) -> float:
        import optuna

        self.started.append(trial.number)
        t0 = time.monotonic()
        objective = self.base.objective
        fb0 = self.run.forward_batches()
        status = "error"
        try:
            params = {**self.recipe.sample(trial, self.candidates), **self.fixed}  # a user's flag wins
            same = _same_as_done(trial)
            if same is not None:  # a duplicate would only repeat a measurement and crowd the choice
                trial.set_user_attr("not_started", f"the same parameters as trial {same}")
                raise optuna.TrialPruned(f"not started: the same parameters as trial {same}")
            setup = self.setup(params)
            trial.set_user_attr("frozen", setup.config.frozen_stages)
            trial.set_user_attr("num_stages", setup.extractor.num_stages)
            probe = solved_probe(setup)
            trial.set_user_attr("cached", probe or setup.config.rand_augment <= 0 and should_cache(
                setup.extractor, len(self.index.train) + len(self.index.val), setup.config.frozen_stages, setup.config.use_cache))
            hard = self.deadline + self.overrun_s if self.deadline is not None else None
            estimate, regardless = self._check_time(trial, setup, params) if self.cost is not None else (None, False)
            if probe:
                value = self._probe_trial(trial, params, setup)
                status = "ok"
                return value
            scores, decide_scores, epochs, n_train, notes, fold_notes, accuracy = [], [], [], [], {}, [], []
            n_classes = len(self.index.classes)
            oof = OutOfFold(self.selection, n_classes)
            n_folds = len(self.selection.folds)
            for i, fold in enumerate(self.selection.folds):
                if hard is not None and time.monotonic() > hard:
                    raise optuna.TrialPruned(f"time budget spent after {i} of {n_folds} folds")
                if i and self.deadline is not None:  # the folds run so far say when the trial would end
                    per_fold = (time.monotonic() - t0) / i
                    if estimate and i == 1:  # what this device really takes per estimated second
                        self.cost_ratios.append(per_fold * n_folds / estimate)
                    if not regardless and time.monotonic() + per_fold * (n_folds - i) > self.deadline:
                        raise optuna.TrialPruned(f"would end past the time budget ({i} of {n_folds} folds took "
                                                 f"{per_fold:.0f}s each)")
                result, notes = self.train_fold(setup, params, fold, deadline=hard)
                fold_notes.append(notes)
                m, logits = score_fold(result.net, setup.extractor, fold.score, n_classes)
                oof.add(fold.score, logits)
                for what, v in (("validation", result.best.score(objective)), ("held-out", m[objective])):
                    if not math.isfinite(v):
                        raise FloatingPointError(f"fold {i}: {what} {objective} is {v}")
                scores.append(m[objective])
                accuracy.append(m["accuracy"])
                decide_scores.append(result.best.score(objective))
                epochs.append(result.best_epoch)
                n_train.append(result.n_train)
                trial.report(statistics.fmean(scores), i)
                if i + 1 < len(self.selection.folds) and trial.should_prune():
                    raise optuna.TrialPruned(f"fold {i}: mean {objective} {statistics.fmean(scores):.4f} below the pruner's bar")
            value = statistics.fmean(scores)
            std = statistics.stdev(scores) if len(scores) > 1 else 0.0
            se = self.selection.standard_error(scores)
            for k, v in {"value_std": std, "value_se": se, "n_folds": len(scores), "fold_scores": scores,
                         "decide_score": statistics.fmean(decide_scores), "best_epochs": epochs,
                         "best_epoch": int(statistics.median_low(epochs)), "epochs_run": len(result.history),
                         "cached": result.cached, "n_train": int(statistics.fmean(n_train)),
                         "accuracy" if objective == "accuracy" else "macro_f1": value,
                         "strategies": _jsonable(notes), "refit_params": _jsonable(refit_values(fold_notes)),
                         "fold_accuracy": accuracy}.items():
                trial.set_user_attr(k, _jsonable(v))
            if oof.sums.numel() <= OOF_MAX_VALUES:  # what ensemble selection reads
                trial.set_user_attr("oof", encode_probs(oof.probs()))
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
                "forward_batches": self.run.forward_batches() - fb0,
                "interrupted": status == "interrupted",
            })


def _same_as_done(trial) -> int | None:
    """The number of a complete trial with exactly these parameters, if any."""
    from optuna.trial import TrialState

    for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == trial.params:
            return t.number
    return None


def solved_probe(setup: TrialSetup) -> bool:
    """A linear probe the convex solver fits (all stages frozen; mixup and RandAugment need the loop)."""
    cfg = setup.config
    return cfg.frozen_stages >= setup.extractor.num_stages and cfg.mixup_alpha <= 0 and cfg.rand_augment <= 0


def _not_started(trial, estimate: float, left: float, stop: bool):
    import optuna

    why = f"estimated {estimate:.0f}s, {max(0.0, left):.0f}s allowed" + ("; nothing cheaper fits: the study stops" if stop else "")
    trial.set_user_attr("not_started", why)
    trial.set_user_attr(OVER_BUDGET, True)
    if stop:
        trial.study.stop()
    return optuna.TrialPruned(f"not started: {why}")


def _safe_attrs(trial, attrs: dict[str, Any]) -> None:
    """Best effort: a second Ctrl-C or a storage hiccup here must not hide the original outcome."""
    try:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
    except BaseException:  # noqa: BLE001
        pass
