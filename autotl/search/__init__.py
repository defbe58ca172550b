"""The strategy search (issue 4): an Optuna study over *how* to transfer.

The space is declared in ``recipes/*.yaml`` (see ``autotl.search._recipe`` for the format): source
model (top-k candidates), frozen stages (relative to the end), learning rate, epochs, regulariser
(none / L2-SP / feature-map KD), its coefficients, DTNH, decay — and every parameter of a registered
strategy (``autotl.strategy.STRATEGIES``). A seeded multivariate TPE sampler proposes trials, a
median or Hyperband pruner stops weak ones from their per-epoch validation score, every trial
reads the frozen prefix from one shared activation cache per source model, and the study lives in
``RUN_DIR/study.db`` (or any ``--storage`` URL) so ``--resume`` continues it.

Entry point: ``autotl.fit(..., trials=N | recipe=NAME)`` / ``autotl fit DIR --trials N``.
"""

from ._cache import SharedActivations
from ._distributed import WorkerResult, heartbeat_kwargs, recipe_from_json, run_worker, study_progress
from ._fit import SearchPlan, plan_search, prefix_cuts, refit_best, search_fit
from ._leaderboard import describe_strategy, leaderboard_table, trial_rows
from ._objective import Objective, TrialFailed
from ._plots import save_plots
from ._recipe import (
    Condition,
    Dimension,
    Recipe,
    list_recipes,
    load_recipe,
    parse_duration,
    parse_recipe,
    recipe_dirs,
    resolve_frozen_relative,
)
from ._study import (
    DEFAULT_STUDY,
    STUDY_FILE,
    SearchInterrupted,
    SearchOutcome,
    SearchSettings,
    finished_trials,
    make_pruner,
    make_sampler,
    make_storage,
    run_study,
    select_best,
    storage_url,
)

__all__ = [
    "Condition", "Dimension", "Recipe", "list_recipes", "load_recipe", "parse_duration", "parse_recipe", "recipe_dirs",
    "resolve_frozen_relative", "SharedActivations", "Objective", "TrialFailed", "SearchSettings", "SearchOutcome",
    "SearchInterrupted", "run_study", "select_best", "finished_trials", "make_pruner", "make_sampler", "make_storage",
    "storage_url", "DEFAULT_STUDY", "STUDY_FILE", "trial_rows", "leaderboard_table", "describe_strategy", "save_plots",
    "search_fit", "prefix_cuts", "SearchPlan", "plan_search", "refit_best",
    "WorkerResult", "run_worker", "heartbeat_kwargs", "recipe_from_json", "study_progress",
]
