"""The search stage of a run: plan (recipe, folds, prefix cache, study) → trials → refit of the winner."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from .. import _console
from .._io import atomic_write_json
from ..errors import AutotlError
from ..options import SearchOptions
from ..run import FinalModel, Run
from ..fitted import fitted_from_training
from ..strategy import StrategyContext, apply_strategies, train_strategy
from .. import train as _train
from ..train import TrainConfig, should_cache
from ._distributed import WORKER_ATTR, worker_attrs
from ._folds import Selection, plan_selection
from ._leaderboard import describe_strategy, leaderboard_table, trial_rows
from ._objective import Objective
from ._plots import save_plots
from ._cost import MAX_TRIAL_SHARE, feasible_frozen, measure_costs
from .._recipe import (FROZEN, Recipe, add_dimensions, fix_targets, load_recipe, parse_duration, resolve_frozen_relative,
                       restrict_choices)
from ._select import portfolio_rank, select_one_se
from ._study import DEFAULT_STUDY, SearchOutcome, SearchSettings, run_study, shown_url, stored_study_attr, storage_url


FEASIBLE_ATTR = "feasible_frozen"  # study attribute: the frozen_stages choices the budget allowed


def prefix_cuts(recipe: Recipe, extractor, n_images: int, base: TrainConfig) -> list[int]:
    """The cuts (frozen prefixes) the recipe may use on this model that will be served from the cache."""
    n = extractor.num_stages
    cuts = {resolve_frozen_relative(v, n) for v in recipe.frozen_values(base.frozen_stages)}
    return sorted(c for c in cuts if c < n and should_cache(extractor, n_images, c, base.use_cache))


def search_cuts(run: Run, recipe: Recipe, base: TrainConfig) -> dict[str, list[int]]:
    """Per candidate, the prefix cuts the recipe's trials will read from the cache: computed in the
    scoring pass, so one forward per model and image serves ranking, probes and fine-tunes."""
    n_images = len(run.index.train) + len(run.index.val)
    return {label: prefix_cuts(recipe, ex, n_images, base) for label, ex in run.extractors.items()}


def _log_trial(metric: str):
    def callback(study, trial) -> None:
        ua = trial.user_attrs
        state = trial.state.name.lower()
        value = trial.value if trial.value is not None else (
            trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
        shown = f"{metric} {value:.4f}" if value is not None else "no score"
        if value is not None and ua.get("value_std") is not None:
            shown += f" ± {ua['value_std']:.3f} ({ua.get('n_folds')} folds)"
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
    """A search ready to run: the objective (run, folds, shared caches), settings and storage."""

    run: Run
    recipe: Recipe
    objective: Objective
    settings: SearchSettings
    url: str
    fingerprint: dict[str, Any]
    prefetch: dict[str, Any]
    objective_reason: str = ""
    ensemble: bool = True  # greedy ensemble selection over the trials after the search
    portfolio: list = field(default_factory=list)  # the recipe's portfolio in its own (prior) order

    @property
    def selection(self) -> Selection:
        return self.objective.selection

    def run_trials(self) -> SearchOutcome:
        """Create or resume the study and run its trials (``SearchInterrupted`` on Ctrl-C)."""
        return run_study(self.objective, self.settings, self.url, fingerprint=self.fingerprint,
                         on_trial=_log_trial(self.objective.base.objective))


def with_pool_dimension(recipe: Recipe) -> Recipe:
    """A source pool adds retrieval K to a recipe that does not search it (0 = off, so the search can
    leave retrieval off); joint fine-tuning needs a trainable backbone, so only for fine-tunes."""
    if recipe.dimension("retrieval_k") is not None:
        return recipe
    spec: dict[str, Any] = {"choices": [0, 2, 4, 8]}
    if recipe.dimension("frozen_stages") is not None:
        spec["when"] = {"frozen_stages": {"not": "all"}}
    return add_dimensions(recipe, {"retrieval_k": spec})


def _val_check(run: Run) -> dict[str, Any] | None:
    """Whether a given val/ folder is cleaner than train/ (``_probe.val_is_cleaner``); None when
    there is no val/ folder of the user's, or too few images to tell."""
    index = run.index
    if index.split != "folders" or not index.val or len(index.val) < 10 or len(index.train) < 10:
        return None
    from ._probe import val_is_cleaner

    return val_is_cleaner(run)


def _candidate_backbones(recipe: Recipe, n_candidates: int) -> Recipe:
    """Keep the ``backbones`` choices (rank positions) that exist among this run's candidates."""
    from ..probe import parse_backbones

    dim = recipe.dimension("backbones")
    if dim is None or dim.kind != "categorical":
        return recipe
    keep = [c for c in dim.choices if max(int(p) for p in str(c).split("+")) <= n_candidates]
    if not keep:
        keep = [dim.choices[0]]
    parse_backbones(keep[0], ["x"] * n_candidates)  # a malformed choice fails here with its one-line message
    return restrict_choices(recipe, "backbones", keep) if len(keep) < len(dim.choices) else recipe


def _baseline_params(recipe: Recipe, baseline: dict[str, Any], candidates: list[str]) -> dict[str, Any]:
    """A portfolio entry's parameters by target (what the objective's set-up reads)."""
    by_target = {recipe.dimension(name).target: value for name, value in baseline.items() if recipe.dimension(name)}
    by_target.setdefault("model", candidates[0])
    return by_target


def portfolio_in_cost_order(objective: Objective, recipe: Recipe) -> Recipe:
    """The portfolio (the recipe's ``baselines``) enqueued cheapest first, by the cost model; the
    order among equal estimates is the recipe's. Entries with a trial estimate are logged."""
    if not recipe.baselines or objective.cost is None:
        return recipe
    costs = []
    for b in recipe.baselines:
        params = {**_baseline_params(recipe, b, objective.candidates), **objective.fixed}
        try:
            costs.append(objective.estimate_seconds(params, objective.setup(params)))
        except (KeyError, ValueError, AutotlError):
            costs.append(float("inf"))
    order = sorted(range(len(costs)), key=lambda i: (costs[i], i))
    _console.log("portfolio (cheapest first): " + ", ".join(
        f"#{i} ≈{costs[i]:.1f}s" if costs[i] != float("inf") else f"#{i}" for i in order))
    return dataclasses.replace(recipe, baselines=[recipe.baselines[i] for i in order])


def without_unreferenced_dropout(recipe: Recipe, selection: Selection, fixed: dict[str, Any]) -> Recipe:
    """Data dropout needs reference images its fold does not train on. Where a fold has none (a
    class too small to spare one: ``Selection.self_decided``) dropout is left out of the space,
    and a fixed ``--dropout-tau`` is refused naming the minimum."""
    if not selection.self_decided:
        return recipe
    from ..dropout.strategy import parse_tau
    from ._folds import MIN_CLASS_IMAGES_FOR_DECISION as need

    dim = recipe.dimension("dropout_tau")
    for where, value in (("--dropout-tau", fixed.get("dropout_tau")),
                         (f"{recipe.source}: dropout_tau", dim.value if dim is not None and dim.kind == "fixed" else None)):
        if value is not None and parse_tau(value) is not None:
            raise AutotlError(f"{where}: data dropout needs reference images each cross-validation fold does not train "
                              f"on, and a class here is too small to spare one; give every class at least {need} labelled "
                              "images (or a val/ folder), or leave data dropout off")
    if dim is None or not dim.choices or all(c is None for c in dim.choices):
        return recipe
    _console.log(f"data dropout is not searched: a class has fewer than {need} labelled images, so the folds have no "
                 "reference images of their own to measure influence on")
    return restrict_choices(recipe, "dropout_tau", [None])


def plan_search(run: Run, base: TrainConfig, opts: SearchOptions) -> SearchPlan:
    """Load the recipe, keep the top candidates, plan the folds, leave out what cannot finish, fill the
    prefix cache, set up the study."""
    recipe = load_recipe(opts.recipe)
    options, fixed = dict(opts.options or {}), dict(opts.fixed_params or {})
    if options.get("source_pool"):
        recipe = with_pool_dimension(recipe)
    recipe = fix_targets(recipe, fixed)
    n_trials = int(opts.trials) if opts.trials is not None else recipe.trials
    budget = parse_duration(opts.time_budget) if opts.time_budget is not None else recipe.time_budget
    run.keep(run.labels[: opts.top_k or recipe.top_k or len(run.labels)])
    selection = _plan_folds(run, recipe, base, opts)
    recipe = without_unreferenced_dropout(recipe, selection, fixed)
    _console.log(f"candidates: {', '.join(f'[bold]{s.label}[/] ({s.weights_origin})' for s in run.sources.values())}; "
                 f"device {run.device}; objective: {base.objective}{opts.objective_reason}; trials scored by "
                 f"{selection.kind} ({len(selection.folds)} folds)")
    user_recipe = recipe
    url = storage_url(run.run_dir, opts.storage)
    name = opts.study or DEFAULT_STUDY
    recipe, cost, keep, estimates = _affordable_space(run, recipe, base, selection, budget,
                                                      stored_study_attr(url, name, FEASIBLE_ATTR) if opts.resume else None)
    prefetch = _fill_prefix_cache(run, recipe, base)
    prefetch["cost_model"] = {**cost.to_json(), "frozen_estimates_s": {k: round(v, 1) for k, v in estimates.items()},
                              "frozen_kept": list(keep) if keep else None}

    recipe = _candidate_backbones(recipe, len(run.labels))
    objective = Objective(run, recipe, base, selection, options=options, fixed=fixed, cost=cost)
    recipe = objective.recipe = portfolio_in_cost_order(objective, recipe)
    settings = SearchSettings(recipe=recipe, trials=n_trials, time_budget=budget, storage=url,
                              study_name=name, resume=opts.resume, seed=run.seed,
                              user_attrs={WORKER_ATTR: worker_attrs(run, base, target=n_trials, options=options,
                                                                    fixed=fixed, cv_folds=opts.cv_folds,
                                                                    cv_repeats=opts.cv_repeats),
                                          FEASIBLE_ATTR: list(keep) if keep else None,
                                          # the user's space (workers rebuild it and restrict it the same way)
                                          "recipe": user_recipe.to_json()})
    fingerprint = {"data_fingerprint": run.index.fingerprint(), "recipe_space": user_recipe.fingerprint(),
                   "objective": base.objective, "candidates": run.labels, "selection": selection.kind,
                   "folds": len(selection.folds)}
    return SearchPlan(run, recipe, objective, settings, url, fingerprint, prefetch, opts.objective_reason, opts.ensemble,
                      list(user_recipe.baselines))


def _plan_folds(run: Run, recipe: Recipe, base: TrainConfig, opts: SearchOptions) -> Selection:
    """The folds that score the trials; a given val/ folder scores alone only when it is the cleaner part."""
    index = run.index
    for label, cuts in (search_cuts(run, recipe, base).items() if index.val else ()):
        run.extractors[label].extract(index.val, cuts, description="val features")  # val's one pass, every cut
    val_check = _val_check(run)
    selection = plan_selection(index, seed=run.seed, k=opts.cv_folds, repeats=opts.cv_repeats,
                               trust_val=val_check is None or val_check["val_cleaner"])
    if val_check is not None:
        selection.decided_by["val_folder"] = val_check["decision"]
        _console.log(f"val/ folder: {val_check['decision']} (out-of-fold accuracy val {val_check['val_oof_accuracy']:.3f}, "
                     f"train {val_check['train_oof_accuracy']:.3f})")
    return selection


def _affordable_space(run: Run, recipe: Recipe, base: TrainConfig, selection: Selection, budget: float | None,
                      stored: list | None):
    """(recipe, cost model, kept frozen_stages choices, their estimates): what each configuration costs
    here, measured now, and the recipe without the ``frozen_stages`` choices that cannot finish (a
    resumed study keeps the ``stored`` space it started with)."""
    with run.phase("cost"):
        cost = measure_costs(run, recipe, base, selection)
    keep, estimates = feasible_frozen(cost, recipe, base, budget, run)
    keep = stored if stored is not None else keep
    frozen_dim = recipe.dimension(FROZEN)
    if frozen_dim is not None and keep and len(keep) < len(frozen_dim.choices):
        dropped = [c for c in frozen_dim.choices if c not in keep]
        recipe = restrict_choices(recipe, FROZEN, keep)
        _console.log("frozen_stages " + ", ".join(f"{c} (≈{estimates.get(str(c), 0):.0f}s a trial)" for c in dropped)
                     + f" left out: more than {MAX_TRIAL_SHARE:.0%} of the {budget or 0:.0f}s budget on this machine "
                     f"(throughput measured in {cost.measure_seconds:.1f}s)")
    return recipe, cost, keep, estimates


def _fill_prefix_cache(run: Run, recipe: Recipe, base: TrainConfig) -> dict[str, Any]:
    """One pass per model computes every prefix the recipe can freeze (trials then train suffixes only);
    what it took, for the card."""
    index = run.index
    t0 = time.monotonic()
    fb0 = run.forward_batches()
    n_images = len(index.train) + len(index.val)
    cuts_by_model = {}
    for label, ex in run.extractors.items():
        cuts = prefix_cuts(recipe, ex, n_images, base)
        cuts_by_model[label] = cuts
        for samples, what in ((index.train, "train"), (index.val, "val")):
            ex.extract(samples, cuts, description=f"{what} prefix cache")
    seconds = time.monotonic() - t0
    batches = run.forward_batches() - fb0
    cut_text = ", ".join(f"{label}: {cuts or 'pooled only'}" for label, cuts in cuts_by_model.items())
    how = f"computed, {batches} batches" if batches else "from the disk cache"
    _console.log(f"prefix cache ready in {seconds:.1f}s ({how}; cuts {cut_text})")
    return {"seconds": round(seconds, 2), "batches": batches, "cuts": cuts_by_model}


def search(run: Run, base: TrainConfig, opts: SearchOptions) -> FinalModel:
    """Plan (:func:`plan_search`), run (or resume) the study and refit its winner."""
    with run.phase("caches"):  # the val pass and the prefix caches (the cost measurement is its own phase)
        plan = plan_search(run, base, opts)
    with run.phase("search"):
        outcome = plan.run_trials()
    with run.phase("refit"):
        return refit_best(plan, outcome)


def refit_best(plan: SearchPlan, outcome: SearchOutcome) -> FinalModel:
    """Retrain the selected strategy on all labelled images for the epoch count its folds chose."""
    run, objective = plan.run, plan.objective
    study, base = outcome.study, objective.base
    rows = trial_rows(study, plan.recipe, objective.candidates, base.objective)

    def params_of(t) -> dict[str, Any]:
        try:
            return {**plan.recipe.params_of(t.params, objective.candidates), **objective.fixed}
        except KeyError:
            return dict(t.params)

    best_trial, rule = _select_trial(plan, study, rows, params_of)
    params = params_of(best_trial)
    labelled = list(run.index.train) + list(run.index.val)
    words = _describe_selected(plan, best_trial, params)
    fitted, notes, refit_info = _refit(plan, best_trial, params, labelled)
    chosen, members = _refit_ensemble(plan, study, best_trial, fitted, params_of, labelled)
    estimate = search_estimate(plan, study, best_trial, chosen)
    _console.log(f"estimate for new images: {estimate.line()}")
    plots = save_plots(study, run.run_dir / "plots")
    atomic_write_json(run.run_dir / "leaderboard.json", rows)
    search_doc = _search_doc(plan, outcome, rows, best_trial, params, words, rule=rule, refit_info=refit_info,
                             ensemble_doc=chosen.doc if plan.ensemble else None, estimate=estimate, plots=plots)
    return FinalModel(fitted, _decided_by(plan, members), {"search_params": params, "description": words, "strategies": notes},
                      search_doc, members=members)


def _select_trial(plan: SearchPlan, study, rows: list[dict], params_of):
    """(the selected trial, the selection rule's record), logged with the leaderboard; an
    ``AutotlError`` saying what went wrong when no trial completed."""
    best_trial, rule = select_one_se(study.get_trials(deepcopy=False), params_of,
                                     oof_labels=[s.label for s in plan.selection.scored_samples],
                                     prior=portfolio_rank(plan.portfolio))
    if best_trial is None:
        raise _no_trial_error(plan.settings.study_name, rows)
    objective = plan.objective
    _console.log(leaderboard_table(rows, objective=objective.base.objective, best=best_trial.number,
                                   show_model=len(objective.candidates) > 1))
    if rule["best_mean_trial"] != best_trial.number:
        _console.log(f"trial {best_trial.number} is within one standard error ({rule['best_se']:.3f}) of the best mean "
                     f"(trial {rule['best_mean_trial']}, {rule['best_mean']:.4f}) and simpler (or on a higher-ranked model): it is selected")
    return best_trial, rule


def _no_trial_error(study_name: str, rows: list[dict]) -> AutotlError:
    """Why no trial completed and what to change: the trials broke (more time would not help), none
    started, or all were pruned or cut off."""
    errors = [r["error"] for r in rows if r.get("error")]
    if errors:
        import re

        low = " ".join(errors).lower()
        fix = ("lower --batch-size or give a smaller --model" if "out of memory" in low or "memoryerror" in low
               else "lower the learning rates (--lr, the recipe's lr range)" if re.search(r"\bnan\b|\binf\b|not finite", low)
               else "fix what the error names (a flag, a file, the recipe's space), or narrow the recipe to strategies that run")
        kinds = sorted({e.split(":", 1)[0] for e in errors})
        return AutotlError(f"no trial of study {study_name!r} completed: {len(errors)} of {len(rows)} trial(s) "
                           f"failed with an error ({', '.join(kinds)}; first: {errors[0][:300]}); {fix}, then run again "
                           "(each trial's error is in the log above)")
    if not rows:
        return AutotlError(f"no trial of study {study_name!r} ran: the time budget ended before the first trial "
                           "started; widen --time-budget (or give --trials)")
    return AutotlError(f"no trial of study {study_name!r} completed ({len(rows)} trial(s), none failed with an "
                       "error: pruned or cut off by the time budget); widen --time-budget, or give --trials, or check the recipe")


def _describe_selected(plan: SearchPlan, trial, params: dict[str, Any]) -> str:
    """The selected strategy in words (logged)."""
    ua = trial.user_attrs
    planned = plan.objective.setup(params)
    words = describe_strategy(params, frozen=planned.config.frozen_stages, num_stages=planned.extractor.num_stages,
                              stage_names=[n for n, _ in planned.extractor.stages],
                              solved_l2=ua.get("lambda") if ua.get("probe") else None)
    _console.log(f"[bold]selected strategy[/] (trial {trial.number}, {plan.selection.kind} {plan.objective.base.objective} "
                 f"{trial.value:.4f} ± {ua.get('value_std', 0.0):.3f}): {words}")
    return words


def _refit_ensemble(plan: SearchPlan, study, best_trial, fitted, params_of, labelled: list):
    """(the chosen ensemble, its refitted members besides the winner); none without ``--ensemble``."""
    chosen, members = ChosenEnsemble(), []
    if plan.ensemble:
        chosen = choose_ensemble(plan, study, best_trial, params_of)
        if chosen.trials:
            members = _refit_members(plan, chosen, best_trial, fitted, params_of, labelled)
    return chosen, members


def _search_doc(plan: SearchPlan, outcome: SearchOutcome, rows: list[dict], best_trial, params: dict[str, Any],
                words: str, *, rule, refit_info: dict, ensemble_doc, estimate, plots) -> dict[str, Any]:
    """The run's ``search`` record (the study, the selection, the refit, the estimate, the leaderboard)."""
    settings, recipe, base = plan.settings, plan.recipe, plan.objective.base
    ua = best_trial.user_attrs
    states: dict[str, int] = {}
    for r in rows:
        states[r["state"].lower()] = states.get(r["state"].lower(), 0) + 1
    done = [r for r in rows if r["state"] in ("COMPLETE", "PRUNED") and r["seconds"] is not None]
    return {
        "study_name": settings.study_name, "storage": shown_url(plan.url),
        "dashboard": f"optuna-dashboard {shown_url(plan.url)}",
        "recipe": recipe.name, "recipe_source": recipe.source, "objective": base.objective,
        "objective_reason": plan.objective_reason.strip(" ()") or None,
        "trials_requested": settings.trials, "time_budget_s": settings.time_budget, "stopped_by": outcome.stopped_by,
        "schedule": outcome.schedule,
        "resumed": not outcome.created, "n_trials": len(rows), "states": states,
        "search_seconds": round(outcome.seconds, 2), "prefix_cache": plan.prefetch,
        "mean_trial_seconds": {"cached": _mean([r["seconds"] for r in done if r["cached"]]),
                               "uncached": _mean([r["seconds"] for r in done if r["cached"] is False])},
        "candidates": plan.objective.candidates, "refit_on": "all labelled images (train + val)", "refit": refit_info,
        "ensemble": ensemble_doc,
        "selection": plan.selection.to_json(), "selection_rule": rule, "estimate": estimate.to_json(),
        "best": {"number": best_trial.number, "value": best_trial.value, "value_std": ua.get("value_std"),
                 "value_se": ua.get("value_se"), "n_folds": ua.get("n_folds"), "decide_score": ua.get("decide_score"),
                 "params": params, "accuracy": ua.get("accuracy"), "macro_f1": ua.get("macro_f1"),
                 "best_epoch": refit_info.get("best_epoch"), "description": words},
        "plots": plots, "leaderboard": rows,
    }


def _decided_by(plan: SearchPlan, members: list) -> dict[str, str]:
    """Which images decided what, for the card."""
    base = plan.objective.base
    decided_by = {
        **plan.selection.decided_by,
        "training": "all labelled images (train + val), for the epoch count the folds chose",
        "early_stopping": "none in the refit (fixed epoch count: the median best epoch over the folds)",
        "trial_selection": plan.selection.decided_by["trial_ranking"] + f" (objective {base.objective})",
        "pruning": "the running mean of the folds' scores (the same scoring parts)",
        "test": "reported only, never used for a decision" if plan.run.index.test else "no test split given",
        "note": "the refit trained on val: the final model's val metrics are not held out; "
                "search.best.value is the cross-validated estimate",
    }
    if members:
        decided_by["ensemble_selection"] = ("greedy forward selection with replacement on the trials' out-of-fold "
                                            "probabilities of the scoring parts (log loss); each member refitted like the winner")
    return decided_by


def _refit(plan: SearchPlan, trial, params: dict[str, Any], labelled: list):
    """(``Fitted``, strategy notes, what the refit did) of ``trial``'s strategy retrained on all
    labelled images: a probe solved with the trial's penalty; a trained net for the epoch count its
    folds chose (median best epoch), no early stopping."""
    run, objective, index = plan.run, plan.objective, plan.run.index
    setup = objective.setup(params)
    ua = trial.user_attrs
    if ua.get("probe"):
        from ._probe import compare_bagging, refit_probe

        bagging = compare_bagging(objective, params, setup, float(ua["lambda"]))
        bag = bagging["use_bag"]
        _console.log(f"trial {trial.number} (a probe): " + (
            f"its {len(plan.selection.folds)} fold models averaged (the bag did not lose to a refit, nested: log loss "
            f"{bagging['bag']['log_loss']:.4f} vs {bagging['single_refit']['log_loss']:.4f})" if bag else
            f"refitted on all {len(labelled)} labelled images (a bag of fold models lost, nested: log loss "
            f"{bagging['bag']['log_loss']:.4f} vs {bagging['single_refit']['log_loss']:.4f})"))
        fitted, notes = refit_probe(objective, params, setup, float(ua["lambda"]), float(ua.get("n_train") or len(labelled)),
                                    labelled, bag=bag)
        return fitted, notes, {"kind": "probe", "l2": notes["probe"]["l2"], "n_train": notes["probe"]["n_train"],
                               "bagging": bagging}
    params = {**params, **(ua.get("refit_params") or {})}  # what the folds chose for the refit (e.g. WiSE-FT alpha)
    cfg = copy.deepcopy(setup.config)
    best_epoch = int(ua.get("best_epoch", cfg.epochs - 1))
    cfg.stop_epoch = best_epoch + 1  # the trials' schedule (same length), stopped where their folds chose
    cfg.early_stopping = False
    ctx = StrategyContext(index, setup.source, setup.extractor, run.run_dir, cfg, labelled,
                          options=dict(objective.options), final=True, candidates=list(objective.candidates),
                          memory=run.memory)
    apply_strategies(ctx, params)
    _console.log(f"refitting trial {trial.number} on all {len(labelled)} labelled images for {cfg.stop_epoch} of its "
                 f"{cfg.epochs}-epoch schedule …")
    result = train_strategy(ctx, index.val, device=run.device)
    fitted = fitted_from_training(result, setup.source, setup.extractor, len(index.classes))
    return fitted, ctx.notes, {"kind": "trained", "schedule_epochs": cfg.epochs, "epochs": cfg.stop_epoch,
                               "best_epoch": best_epoch}


def _configurations(study) -> list[list[float]]:
    """Per-fold accuracy of every configuration the search scored: each complete trial, and each
    penalty of a probe trial's path (all chosen on the same folds)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE":
            continue
        ua = t.user_attrs
        path = (ua.get("penalty_path") or {}).get("fold_accuracy")
        out += [list(c) for c in path or ([ua["fold_accuracy"]] if ua.get("fold_accuracy") else [])]
    return out


def ensemble_fold_accuracy(plan: SearchPlan, chosen: "ChosenEnsemble") -> list[float]:
    """The published ensemble's accuracy on each fold's scoring part, from its members' out-of-fold
    probabilities (averaged over partitions when the folds repeat)."""
    import numpy as np

    from ..ensemble import decode_probs

    samples = plan.selection.scored_samples
    row = {str(s.path): i for i, s in enumerate(samples)}
    probs = sum(w * decode_probs(t.user_attrs["oof"]).astype(np.float64) for t, w in zip(chosen.trials, chosen.weights))
    pred = probs.argmax(1)
    out = []
    for fold in plan.selection.folds:
        idx = [row[str(s.path)] for s in fold.score]
        out.append(float(np.mean([pred[i] == samples[i].label for i in idx])) if idx else 0.0)
    return out


def search_estimate(plan: SearchPlan, study, best_trial, chosen: "ChosenEnsemble"):
    """The headline estimate of a searched model (``autotl.estimate``): the test split when there is
    one, else the selected trial's (or the ensemble's) cross-validated accuracy corrected for the
    choice among every configuration scored on the same folds."""
    from ..estimate import corrected_cv

    ua = best_trial.user_attrs
    configs = _configurations(study)
    selected = list(ua.get("fold_accuracy") or [])
    what = f"trial {best_trial.number}"
    if chosen.trials:
        selected = ensemble_fold_accuracy(plan, chosen)
        configs.append(selected)
        what = f"ensemble of trials {', '.join(str(t.number) for t in chosen.trials)}"
    se = plan.selection.standard_error(selected) if selected else 0.0
    return corrected_cv(selected, configs, se, plan.selection.n_scored, extra={"of": what})


@dataclass
class ChosenEnsemble:
    """Trials picked by greedy selection (primary first) with their weights, and what the card says."""

    trials: list = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    doc: dict[str, Any] | None = None


ENSEMBLE_MAX_MEMBERS = 4


def choose_ensemble(plan: SearchPlan, study, best_trial, params_of) -> ChosenEnsemble:
    """Greedy ensemble selection over the complete trials' out-of-fold probabilities. The ensemble
    replaces the selected trial only when it has two or more members and its out-of-fold log loss
    and objective are both better than the selected trial's own out-of-fold predictions."""
    import numpy as np
    import torch

    from ..ensemble import decode_probs, greedy_ensemble, log_loss
    from ._distributed import interrupted_numbers, is_interrupted

    cut = interrupted_numbers(study)
    trials = [t for t in study.get_trials(deepcopy=False)
              if t.state.name == "COMPLETE" and t.user_attrs.get("oof") and not is_interrupted(t, cut)]
    numbers = [t.number for t in trials]
    if best_trial.number not in numbers or len(trials) < 2:
        return ChosenEnsemble(doc={"used": False, "reason": "fewer than two complete trials with out-of-fold predictions"})
    samples = plan.selection.scored_samples
    labels = np.array([s.label for s in samples])
    probs = [decode_probs(t.user_attrs["oof"]) for t in trials]
    picked = greedy_ensemble(probs, labels, max_members=ENSEMBLE_MAX_MEMBERS)
    n_classes = probs[0].shape[1]

    def objective_of(p):
        m = _train.classification_metrics(torch.from_numpy(np.log(np.clip(p, 1e-12, 1.0))),
                                          torch.as_tensor(labels, dtype=torch.long), n_classes)
        return m[plan.objective.base.objective]

    single = probs[numbers.index(best_trial.number)]
    ens = picked.probs(probs)
    doc = {"candidates": len(trials), "members": [{"trial": trials[i].number, "picks": picked.counts[i],
                                                   "weight": round(picked.weights[i], 4)} for i in picked.members],
           "oof_log_loss": {"selected_trial": round(log_loss(single, labels), 4), "ensemble": round(log_loss(ens, labels), 4)},
           "oof_objective": {"selected_trial": round(objective_of(single), 4), "ensemble": round(objective_of(ens), 4)},
           "n_scored": len(labels)}
    better = (len(picked.members) >= 2 and doc["oof_log_loss"]["ensemble"] < doc["oof_log_loss"]["selected_trial"]
              and doc["oof_objective"]["ensemble"] > doc["oof_objective"]["selected_trial"])
    if not better:
        doc.update(used=False, reason="the greedy ensemble has one member, or is not strictly better out of fold than the "
                                      "selected trial (lower log loss and a higher objective)")
        _console.log(f"ensemble: not used ({doc['reason']})")
        return ChosenEnsemble(doc=doc)
    order = sorted(picked.members, key=lambda i: (numbers[i] != best_trial.number, -picked.counts[i]))
    doc["used"] = True
    _console.log(f"ensemble of {len(order)} trials ({', '.join(str(trials[i].number) for i in order)}): out-of-fold log loss "
                 f"{doc['oof_log_loss']['selected_trial']:.4f} → {doc['oof_log_loss']['ensemble']:.4f}, "
                 f"{plan.objective.base.objective} {doc['oof_objective']['selected_trial']:.4f} → {doc['oof_objective']['ensemble']:.4f}")
    return ChosenEnsemble([trials[i] for i in order], [picked.weights[i] for i in order], doc)


def _refit_members(plan: SearchPlan, chosen: ChosenEnsemble, best_trial, best_fitted, params_of, labelled: list) -> list:
    """Every member refitted on all labelled images (the winner's refit is reused), in the graph's order."""
    from ..ensemble import EnsembleMember

    members = []
    for trial, weight in zip(chosen.trials, chosen.weights):
        params = params_of(trial)
        fitted = best_fitted if trial.number == best_trial.number else _refit(plan, trial, params, labelled)[0]
        setup = plan.objective.setup(params)
        words = describe_strategy(params, frozen=setup.config.frozen_stages, num_stages=setup.extractor.num_stages,
                                  solved_l2=trial.user_attrs.get("lambda") if trial.user_attrs.get("probe") else None)
        members.append(EnsembleMember(fitted, weight, f"trial {trial.number}", words))
    return members
