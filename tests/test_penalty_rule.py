"""The probe trials' penalty rule (``penalty_rule``): its flag, its recipe dimension and its choice."""

from __future__ import annotations

import pytest

from autotl.errors import AutotlError
from autotl.run import Run
from autotl.train import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

MODEL = "test_efficientnet"


def test_one_se_picks_the_strongest_penalty_within_one_standard_error():
    from autotl.probe import penalty_one_se

    lambdas = (1.0, 0.1, 0.01)
    # the least out-of-fold loss is the weakest penalty's, but its folds spread widely: the stronger
    # two are within one standard error (0.1 / sqrt(3)) of it, the strongest of them is kept
    fold_losses = [[0.32, 0.30, 0.34], [0.28, 0.27, 0.29], [0.15, 0.25, 0.35]]
    oof = [0.31, 0.28, 0.25]
    assert penalty_one_se(lambdas, fold_losses, oof) == 1
    # tight folds: nothing else is within one standard error, the minimum stays
    assert penalty_one_se(lambdas, [[0.3] * 3, [0.28] * 3, [0.25, 0.25, 0.26]], oof) == 2
    # 6 folds of 2 partitions of 3: the folds of the two partitions reuse the same images, so the
    # standard error is the spread over sqrt(3), not sqrt(6) (0.052, not 0.037): the middle penalty,
    # 0.05 above the least loss, is within the first band and outside the second
    six = [[0.32] * 6, [0.3] * 6, [0.15, 0.25, 0.35, 0.15, 0.25, 0.35]]
    oof = [0.32, 0.30, 0.25]
    assert penalty_one_se(lambdas, six, oof, k=3) == 1
    assert penalty_one_se(lambdas, six, oof) == 2


def test_penalty_rule_flag_fixes_the_trial_parameter_and_is_checked(tmp_path):
    from typer.main import get_command

    from autotl.cli import _fit_options, app
    from autotl.options import FitOptions

    command = get_command(app).commands["fit"]
    opts = FitOptions(**_fit_options(command.make_context("fit", ["data", "--penalty-rule", "one_se"]).params))
    assert opts.fixed_params == {"penalty_rule": "one_se"}
    data = tmp_path / "data"
    data.mkdir()
    with pytest.raises(AutotlError, match="--penalty-rule 'median'"):
        FitOptions(fixed_params={"penalty_rule": "median"}).check(data)


def test_default_recipe_searches_the_rule_for_probes_and_its_portfolio_keeps_the_log_loss():
    from autotl.search import load_recipe

    recipe = load_recipe("default")
    dim = next(d for d in recipe.dimensions if d.target == "penalty_rule")
    assert dim.choices == ("logloss", "one_se") and [(c.key, c.values, c.negate) for c in dim.when] == [("frozen_stages", ("all",), False)]
    assert all(entry["penalty_rule"] == "logloss" for entry in recipe.baselines)


@pytest.fixture
def run(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", {"a": 8, "b": 8, "c": 8}, size=(40, 32))
    models = [f"{MODEL}=random"]
    return Run.open(data, tmp_path / "run", models=models, device="cpu", cache_dir=tmp_path / "cache")


def test_the_rule_picks_the_trials_penalty_on_the_same_path(run, monkeypatch):
    """A probe trial with ``penalty_rule: one_se`` solves the same path as the default trial and keeps
    the penalty the rule names; the default keeps the least out-of-fold loss."""
    import numpy as np

    import autotl.probe
    from autotl.probe import ProbeFeatures, penalty_one_se
    from autotl.search import SearchOptions, parse_recipe, plan_search
    from autotl.search._probe import cross_validate_probe

    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "space": {"frozen_stages": ["all"]}}, "t")
    plan = plan_search(run, TrainConfig(objective="accuracy"), SearchOptions(trials=1, recipe=recipe, cv_folds=3, cv_repeats=1))
    objective = plan.objective
    params = {"frozen_stages": "all", "model": run.labels[0]}
    lambdas = (1.0, 0.1, 0.01, 0.001)
    default = cross_validate_probe(objective, params, objective.setup(params), lambdas=lambdas)
    ruled_params = {**params, "penalty_rule": "one_se"}
    ruled = cross_validate_probe(objective, ruled_params, objective.setup(ruled_params), lambdas=lambdas)
    assert ruled.oof_loss == pytest.approx(default.oof_loss)  # the same fits
    assert default.chosen == int(np.argmin(default.oof_loss))
    assert ruled.chosen == penalty_one_se(lambdas, ruled.fold_losses, ruled.oof_loss, k=objective.selection.k)
    assert ruled.notes["penalty_rule"] == "one_se" and "penalty_rule" not in default.notes
    assert ProbeFeatures().describe(ruled_params) == "penalty by the one_se rule"
    # on these separable features both rules may keep the weakest penalty: a rule that names the
    # strongest shows that the rule, not the log-loss minimum, decides the trial's penalty
    monkeypatch.setitem(autotl.probe.PENALTY_CHOICE, "one_se", lambda lams, fold_losses, oof, k=None: 0)
    assert default.chosen != 0
    assert cross_validate_probe(objective, ruled_params, objective.setup(ruled_params), lambdas=lambdas).lam == 1.0
    assert ProbeFeatures().describe({**ruled_params, "flip": True}).endswith("flip TTA + penalty by the one_se rule")
    with pytest.raises(AutotlError, match="penalty_rule 'median'"):
        cross_validate_probe(objective, {**params, "penalty_rule": "median"}, objective.setup(params), lambdas=lambdas)


def test_a_trial_on_the_same_rows_reads_the_measured_path_and_other_rows_solve_again(run, monkeypatch):
    """Trials that differ only in the penalty rule measure one path (solved once, read by the second);
    a trial whose folds train on other rows (a dropped image) is solved again."""
    import autotl.search._probe as probe_trials
    from autotl.search import SearchOptions, parse_recipe, plan_search
    from autotl.search._probe import cross_validate_probe

    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "space": {"frozen_stages": ["all"]}}, "t")
    plan = plan_search(run, TrainConfig(objective="accuracy"), SearchOptions(trials=1, recipe=recipe, cv_folds=3, cv_repeats=1))
    objective = plan.objective
    params = {"frozen_stages": "all", "model": run.labels[0]}
    solved = lambda: run.memory.counts["probe paths solved"]  # noqa: E731
    default = cross_validate_probe(objective, params, objective.setup(params))
    assert solved() == 1
    ruled = cross_validate_probe(objective, {**params, "penalty_rule": "one_se"}, objective.setup(params))
    assert solved() == 1  # the same rows: nothing solved
    assert ruled.fold_scores == default.fold_scores and ruled.oof_loss == default.oof_loss

    real_training = probe_trials.fold_training

    def one_dropped(objective, params, setup):
        train_sets, contexts = real_training(objective, params, setup)
        return [s[1:] for s in train_sets], contexts

    monkeypatch.setattr(probe_trials, "fold_training", one_dropped)
    other = cross_validate_probe(objective, params, objective.setup(params))
    assert solved() == 2 and other.n_train == [n - 1 for n in default.n_train]
