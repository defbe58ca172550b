"""The strategy search: an Optuna study over *how* to transfer.

The space is declared in ``recipes/*.yaml`` (see ``autotl._recipe`` for the format): source
model (top-k candidates), frozen stages (relative to the end), learning rate, epochs, regulariser
(none / L2-SP / feature-map KD), its coefficients, DTNH, decay — and every parameter of a registered
strategy (``autotl.strategy.STRATEGIES``). A seeded multivariate TPE sampler proposes trials, a
median or Hyperband pruner stops weak ones from the running mean of their fold scores, every trial
is scored by cross-validation on images that decided nothing about it (``_folds``), the winner is
chosen by the one-standard-error rule (``_select``), every trial reads the frozen prefix from one
shared activation cache per source model (``autotl.activations``), and the study lives in
``RUN_DIR/study.db`` (or any ``--storage`` URL) so ``--resume`` continues it.

Entry point: ``autotl.fit(DIR)`` / ``autotl fit DIR`` (searching is the default).
"""

from ._distributed import heartbeat_kwargs, recipe_from_json, study_progress
from ._worker import WorkerResult, run_worker
from ..options import SearchOptions
from ._fit import SearchPlan, plan_search, prefix_cuts, refit_best, search, search_cuts, with_pool_dimension
from ._folds import Fold, Selection, plan_selection, stratified_folds
from ._select import complexity, select_one_se
from ._leaderboard import describe_strategy, leaderboard_table, trial_rows
from ._objective import Objective, TrialFailed
from ._plots import save_plots
from .._recipe import (
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
    storage_url,
)

__all__ = [
    "Condition", "Dimension", "Recipe", "list_recipes", "load_recipe", "parse_duration", "parse_recipe", "recipe_dirs",
    "resolve_frozen_relative", "Objective", "TrialFailed", "SearchSettings", "SearchOutcome",
    "SearchInterrupted", "run_study", "finished_trials", "make_pruner", "make_sampler", "make_storage",
    "storage_url", "DEFAULT_STUDY", "STUDY_FILE", "trial_rows", "leaderboard_table", "describe_strategy", "save_plots",
    "search", "search_cuts", "prefix_cuts", "SearchOptions", "SearchPlan", "plan_search", "refit_best", "with_pool_dimension",
    "Fold", "Selection", "plan_selection", "stratified_folds", "complexity", "select_one_se",
    "WorkerResult", "run_worker", "heartbeat_kwargs", "recipe_from_json", "study_progress",
]
