"""``fit`` with a search: candidates → shared prefix cache → study → refit of the best → finish."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import _console
from .._io import atomic_write_json
from ..data import DatasetIndex
from ..errors import AutotlError
from ..features import FeatureExtractor
from ..models import DEFAULT_MODEL, ModelSpec, SourceModel
from ..strategy import StrategyContext, apply_strategies
from .. import train as _train
from ..train import TrainConfig, should_cache
from ._cache import SharedActivations
from ._distributed import WORKER_ATTR, worker_attrs
from ._leaderboard import describe_strategy, leaderboard_table, trial_rows
from ._objective import Objective
from ._plots import save_plots
from ._recipe import Recipe, load_recipe, parse_duration, resolve_frozen_relative
from ._study import DEFAULT_STUDY, SearchOutcome, SearchSettings, run_study, select_best, storage_url


def prefix_cuts(recipe: Recipe, extractor, n_images: int, base: TrainConfig) -> list[int]:
    """The cuts (frozen prefixes) the recipe may use on this model that will be served from the cache."""
    n = extractor.num_stages
    cuts = {resolve_frozen_relative(v, n) for v in recipe.frozen_values(base.frozen_stages)}
    return sorted(c for c in cuts if c < n and should_cache(extractor, n_images, c, base.use_cache))


def _log_trial(objective: Objective, metric: str):
    def callback(study, trial) -> None:
        ua = trial.user_attrs
        state = trial.state.name.lower()
        value = trial.value if trial.value is not None else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        shown = f"{metric} {value:.4f}" if value is not None else "no score"
        frozen = f"frozen {ua.get('frozen')}/{ua.get('num_stages')}" if ua.get("frozen") is not None else ""
        extra = f" — {ua['error']}" if ua.get("error") else ""
        colour = {"complete": "green", "pruned": "yellow", "fail": "red"}.get(state, "white")
        _console.log(f"trial {trial.number:>3} [{colour}]{state:<8}[/] {shown}  {ua.get('seconds', 0):6.1f}s "
                     f"{'cached' if ua.get('cached') else 'images'}  {frozen}  "
                     + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
                     + extra)
    return callback


def _mean(xs: list[float]) -> float | None:
    return round(statistics.fmean(xs), 3) if xs else None


@dataclass
class SearchPlan:
    """A search ready to run: the objective (candidates, shared caches), settings and storage."""

    index: DatasetIndex
    run_dir: Path
    recipe: Recipe
    objective: Objective
    settings: SearchSettings
    url: str
    fingerprint: dict[str, Any]
    prefetch: dict[str, Any]
    objective_reason: str = ""

    def run(self) -> SearchOutcome:
        """Create or resume the study and run its trials (``SearchInterrupted`` on Ctrl-C)."""
        return run_study(self.objective, self.settings, self.url, fingerprint=self.fingerprint,
                         on_trial=_log_trial(self.objective, self.objective.base.objective))


def plan_search(
    index: DatasetIndex,
    run_dir: Path,
    models: Sequence[str | ModelSpec],
    base: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    cache_dir: str | os.PathLike | None = None,
    trials: int | None = None,
    time_budget: str | float | None = None,
    recipe: str | os.PathLike | Recipe | None = None,
    resume: bool = False,
    storage: str | None = None,
    study_name: str | None = None,
    top_k: int | None = None,
    fixed: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    objective_reason: str = "",
) -> SearchPlan:
    """Load the recipe and the candidate models, fill the prefix cache, and set up the study."""
    from ..fit import _load_sources, default_cache_dir

    recipe = load_recipe(recipe)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    n_trials = int(trials) if trials is not None else recipe.trials
    if n_trials < 1:
        raise AutotlError(f"--trials {trials}: give at least 1")
    budget = parse_duration(time_budget) if time_budget is not None else recipe.time_budget
    if top_k is not None and top_k < 1:
        raise AutotlError(f"--top-k {top_k}: give at least 1")
    models = list(models) or [DEFAULT_MODEL]
    k = top_k or recipe.top_k or len(models)
    loaded: list[SourceModel] = _load_sources(models[:k])
    sources = {s.label: s for s in loaded}
    if len(sources) != len(loaded):
        raise AutotlError("--model: the same model is given twice; give each candidate once")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    cache_dir = cache_dir or default_cache_dir()
    extractors = {label: SharedActivations(FeatureExtractor(s, device=device, cache_dir=cache_dir), index.train, index.val, index.test)
                  for label, s in sources.items()}
    _console.log(f"candidates: {', '.join(f'[bold]{s.label}[/] ({s.weights_origin})' for s in loaded)}; device {device}; "
                 f"objective: validation {base.objective}{objective_reason}")

    # one pass per model computes every prefix the recipe can freeze; trials then train suffixes only
    t0 = time.monotonic()
    fb0 = sum(e.forward_batches for e in extractors.values())
    n_images = len(index.train) + len(index.val)
    cuts_by_model = {}
    for label, ex in extractors.items():
        cuts = prefix_cuts(recipe, ex, n_images, base)
        cuts_by_model[label] = cuts
        for samples, what in ((index.train, "train"), (index.val, "val")):
            ex.extractor.extract(samples, cuts, description=f"{what} prefix cache")
    seconds = time.monotonic() - t0
    batches = sum(e.forward_batches for e in extractors.values()) - fb0
    cut_text = ", ".join(f"{label}: {cuts or 'pooled only'}" for label, cuts in cuts_by_model.items())
    how = f"computed, {batches} batches" if batches else "from the disk cache"
    _console.log(f"prefix cache ready in {seconds:.1f}s ({how}; cuts {cut_text})")

    url = storage_url(run_dir, storage)
    settings = SearchSettings(recipe=recipe, trials=n_trials, time_budget=budget, storage=url,
                              study_name=study_name or DEFAULT_STUDY, resume=resume, seed=seed,
                              user_attrs={WORKER_ATTR: worker_attrs(index, run_dir, [str(s.spec) for s in loaded], base,
                                                                    target=n_trials, seed=seed, options=dict(options or {}),
                                                                    fixed=dict(fixed or {}))})
    objective = Objective(index, recipe, sources, extractors, base, Path(run_dir), device, options=dict(options or {}),
                          fixed=dict(fixed or {}))
    fingerprint = {"data_fingerprint": index.fingerprint(), "recipe_space": recipe.fingerprint(),
                   "objective": base.objective, "candidates": list(sources)}
    prefetch = {"seconds": round(seconds, 2), "batches": batches, "cuts": cuts_by_model}
    return SearchPlan(index, Path(run_dir), recipe, objective, settings, url, fingerprint, prefetch, objective_reason)


def search_fit(
    index: DatasetIndex,
    run_dir: Path,
    models: Sequence[str | ModelSpec],
    base: TrainConfig,
    *,
    start: float,
    refit_on_val: bool = False,
    **kwargs: Any,
):
    """Run (or resume) the strategy search, refit the best strategy and ``finish`` it. Returns a FitResult.
    ``kwargs`` go to :func:`plan_search`."""
    if refit_on_val and not index.val:
        raise AutotlError("--refit-on-val: this data set has no validation images")
    plan = plan_search(index, run_dir, models, base, **kwargs)
    outcome = plan.run()
    return refit_best(plan, outcome, start=start, refit_on_val=refit_on_val)


def refit_best(plan: SearchPlan, outcome: SearchOutcome, *, start: float, refit_on_val: bool = False):
    """Retrain the best trial's strategy (train, or train+val), then evaluate/export/verify/describe it."""
    from ..fit import finish

    index, run_dir, recipe, objective = plan.index, plan.run_dir, plan.recipe, plan.objective
    settings, study, base = plan.settings, outcome.study, objective.base
    candidates = objective.candidates
    rows = trial_rows(study, recipe, candidates, base.objective)
    best_trial = select_best(study)
    if best_trial is None:
        errors = [r["error"] for r in rows if r.get("error")]
        raise AutotlError(f"no trial of study {settings.study_name!r} completed ({len(rows)} trials"
                          + (f"; first error: {errors[0]}" if errors else "") + "); widen --time-budget or check the recipe")
    _console.log(leaderboard_table(rows, objective=base.objective, best=best_trial.number, show_model=len(candidates) > 1))

    params = {**objective.fixed, **recipe.params_of(best_trial.params, candidates)}
    setup = objective.setup(params)
    cfg = setup.config
    ctx = StrategyContext(index, setup.source, setup.extractor, run_dir, cfg, list(index.train),
                          train_fn=_train.train_model, options=dict(objective.options), final=True)
    apply_strategies(ctx, params)
    best_epoch = int(best_trial.user_attrs.get("best_epoch", cfg.epochs - 1))
    if refit_on_val:
        ctx.train_samples = list(ctx.train_samples) + list(index.val)
        ctx.config.epochs = best_epoch + 1  # the epoch count that was best on val; no early stopping
        ctx.config.patience = ctx.config.epochs + 1
    words = describe_strategy(params, frozen=cfg.frozen_stages, num_stages=setup.extractor.num_stages,
                              stage_names=[n for n, _ in setup.extractor.stages])
    _console.log(f"[bold]best strategy[/] (trial {best_trial.number}, validation {base.objective} {best_trial.value:.4f}): {words}")
    _console.log("refitting it on " + ("train + val" if refit_on_val else "train") + " …")
    result = ctx.train_fn(setup.source, ctx.train_samples, index.val, len(index.classes), ctx.config,
                          extractor=setup.extractor, device=objective.device)

    plots = save_plots(study, run_dir / "plots")
    atomic_write_json(run_dir / "leaderboard.json", rows)
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"].lower()] = states.get(r["state"].lower(), 0) + 1
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["seconds"] is not None]
    search = {
        "study_name": settings.study_name, "storage": plan.url, "dashboard": f"optuna-dashboard {plan.url}",
        "recipe": recipe.name, "recipe_source": recipe.source, "objective": base.objective,
        "objective_reason": plan.objective_reason.strip(" ()") or None,
        "trials_requested": settings.trials, "time_budget_s": settings.time_budget, "stopped_by": outcome.stopped_by,
        "resumed": not outcome.created, "n_trials": len(rows), "states": states,
        "search_seconds": round(outcome.seconds, 2), "prefix_cache": plan.prefetch,
        "mean_trial_seconds": {"cached": _mean([r["seconds"] for r in done if r["cached"]]),
                               "uncached": _mean([r["seconds"] for r in done if r["cached"] is False])},
        "candidates": candidates, "refit_on_val": refit_on_val,
        "best": {"number": best_trial.number, "value": best_trial.value, "params": params,
                 "accuracy": best_trial.user_attrs.get("accuracy"), "macro_f1": best_trial.user_attrs.get("macro_f1"),
                 "best_epoch": best_epoch, "description": words},
        "plots": plots, "leaderboard": rows,
    }
    decided_by = {
        "training": "train + val splits (--refit-on-val), for the best trial's epoch count" if refit_on_val else "train split",
        "early_stopping": ("none in the refit (fixed epoch count from the best trial); val decided it during the search"
                           if refit_on_val else "val split"),
        "trial_selection": f"val split, objective {base.objective} (best complete trial; ties: lower val loss)",
        "pruning": "val split (per-epoch objective reported to the pruner)",
        "test": "reported only, never used for a decision" if index.test else "no test split given",
    }
    if refit_on_val:
        decided_by["note"] = "the refit trained on val: its val metrics are not held out; see search.best.value"
    return finish(index, setup.source, result, setup.extractor, run_dir, start, search=search, decided_by=decided_by,
                  strategy_extra={"search_params": params, "description": words, "strategies": ctx.notes})
