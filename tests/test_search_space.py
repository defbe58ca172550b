"""The widened search space: augmentation settings reach training, the cost estimator keeps the sampler
to what can finish."""

from __future__ import annotations

import types

import optuna
import pytest
import torch
from optuna.trial import TrialState

from autotl.models import create_source_model
from autotl.run import Run
from autotl.search._cost import CostModel, feasible_frozen, measure_costs
from autotl.search._fit import plan_search
from autotl.options import SearchOptions
from autotl._recipe import load_recipe, parse_recipe
from autotl.strategy import config_from_params
from autotl.train import TrainConfig, mixup, train_model

pytestmark = pytest.mark.usefixtures("single_thread")
MODEL = "test_efficientnet=random"


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", {"cat": 8, "dog": 8}, splits=["train", "val"], size=(40, 32))


def test_mixup_mixes_target_rows_only_and_mixes_the_loss():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    out, mix = mixup(x, 4, alpha=0.4)
    assert mix.perm is not None and 0.0 <= mix.lam <= 1.0
    assert torch.allclose(out[:4], mix.lam * x[:4] + (1 - mix.lam) * x[:4][mix.perm])
    assert torch.equal(out[4:], x[4:])  # extra rows (joint fine-tuning's source images) ride unmixed
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    ce = torch.nn.CrossEntropyLoss()
    assert torch.allclose(mix.loss(ce, logits, y), mix.lam * ce(logits, y) + (1 - mix.lam) * ce(logits, y[mix.perm]))
    same, none = mixup(x, 4, alpha=0.0)
    assert same is x and none.loss(ce, logits, y) == ce(logits, y)


def _train(data, cfg):
    from autotl.data import scan_dataset

    index = scan_dataset(data)
    source = create_source_model(MODEL)
    return train_model(source, index.train, index.val, 2, cfg, device="cpu")


def test_mixup_alpha_reaches_the_training_step(data, monkeypatch):
    import autotl.train as train_mod

    seen = []
    real = train_mod.mixup

    def spy(x, n, alpha):
        seen.append(alpha)
        return real(x, n, alpha)

    monkeypatch.setattr(train_mod, "mixup", spy)
    _train(data, TrainConfig(frozen_stages="all", epochs=1, batch_size=8, mixup_alpha=0.3))
    assert seen and set(seen) == {0.3}


def test_rand_augment_reaches_the_training_transform(data, monkeypatch):
    import autotl.train as train_mod
    from autotl.features import train_transform

    seen = []

    def spy(data_config, *, rand_augment=0):
        seen.append(rand_augment)
        return train_transform(data_config, rand_augment=rand_augment)

    monkeypatch.setattr(train_mod, "train_transform", spy)
    result = _train(data, TrainConfig(frozen_stages=-1, epochs=1, batch_size=8, rand_augment=7))
    assert seen == [7] and result.cached is False  # decoded images, not the prefix cache
    # and timm builds a RandAugment of that magnitude
    tf = train_transform(create_source_model(MODEL).data_config, rand_augment=7)
    ra = [t for t in tf.transforms if type(t).__name__ == "RandAugment"]
    assert ra and all(op.magnitude == 7 for op in ra[0].ops)


def test_new_dimensions_are_train_config_fields():
    cfg = config_from_params({"mixup_alpha": 0.2, "rand_augment": 6, "label_smoothing": 0.05, "weight_decay": 0.01})
    assert (cfg.mixup_alpha, cfg.rand_augment, cfg.label_smoothing, cfg.weight_decay) == (0.2, 6, 0.05, 0.01)
    recipe = load_recipe("default")
    for name in ("mixup_alpha", "rand_augment", "label_smoothing", "weight_decay"):
        assert recipe.dimension(name) is not None
    assert set(recipe.dimension("frozen_stages").choices) >= {"all", -1, -2, 0}


def _fake_run(num_stages=4):
    return types.SimpleNamespace(extractors={"m": types.SimpleNamespace(num_stages=num_stages, map_bytes=lambda n, c: 0,
                                                                        max_cache_bytes=1 << 30, feature_width=lambda cut: 64)})


def test_estimator_excludes_what_cannot_finish():
    recipe = parse_recipe({"space": {"frozen_stages": ["all", -1, 0], "epochs": {"low": 2, "high": 5}}}, "t")
    cost = CostModel(step={("m", 4): 1e-4, ("m", 3): 0.01, ("m", 0): 1.0}, eval={("m", 4): 1e-5, ("m", 3): 1e-3, ("m", 0): 0.1},
                     num_stages={"m": 4}, fold_sizes=(20.0, 5.0, 5.0), n_folds=5, n_images=30)
    base = TrainConfig()
    keep, est = feasible_frozen(cost, recipe, base, 60.0, _fake_run())
    # full network: 5 folds x 2 epochs x 20 images x 1 s = 200 s > a quarter of 60 s: left out
    assert est["0"] > 30 and 0 not in keep and keep == ["all", -1]
    # all stages frozen is a solved probe: its cost is the solver's, not a training loop's
    assert est["all"] == pytest.approx(cost.probe_seconds(64, 1))
    assert feasible_frozen(cost, recipe, base, 1000.0, _fake_run())[0] == ["all", -1, 0]
    # the estimate grows with epochs and with retrieved rows
    cfg = TrainConfig(frozen_stages=3, epochs=2)
    more = TrainConfig(frozen_stages=3, epochs=4)
    assert cost.trial_seconds("m", more) > cost.trial_seconds("m", cfg)
    assert cost.trial_seconds("m", cfg, {"retrieval_k": 4}) > cost.trial_seconds("m", cfg)


def test_measured_costs_rank_deeper_cuts_dearer(data, tmp_path):
    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    recipe = parse_recipe({"space": {"frozen_stages": ["all", -1, 0]}}, "t")
    from autotl.search._folds import plan_selection

    cost = measure_costs(run, recipe, TrainConfig(), plan_selection(run.index, k=2, repeats=1))
    n = cost.num_stages[MODEL.split("=")[0]]
    label = MODEL.split("=")[0]
    assert cost.step[(label, 0)] > cost.step[(label, n - 1)] > 0
    assert cost.decode > 0 and cost.n_folds == 2


def test_a_trial_that_cannot_finish_is_not_started(data, tmp_path, monkeypatch):
    import autotl.train as train_mod

    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    recipe = parse_recipe({"trials": 5, "pruner": {"type": "none"}, "space": {"frozen_stages": [-1], "epochs": 1}}, "t")
    plan = plan_search(run, base, SearchOptions(trials=5, time_budget=5, recipe=recipe, cv_folds=2, cv_repeats=1))
    plan.objective.cost.trial_seconds = lambda *a, **k: 1e6  # an hour-long configuration
    monkeypatch.setattr(train_mod, "train_model", lambda *a, **k: pytest.fail("an infeasible trial was trained"))
    out = plan.run_trials()
    # nothing the recipe allows could finish: the first such trial is not started and the study stops
    # (it does not burn its five trials on instant prunes)
    (trial,) = out.study.get_trials(deepcopy=False)
    assert trial.state == TrialState.PRUNED and trial.user_attrs["estimated_seconds"] == 1e6
    assert "allowed" in trial.user_attrs["not_started"] and "study stops" in trial.user_attrs["not_started"]


def test_no_trial_may_take_more_than_its_share_of_the_budget(data, tmp_path, monkeypatch):
    """Time is left, but a configuration estimated at most of the budget is not started."""
    import autotl.train as train_mod

    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "space": {"frozen_stages": [-1], "epochs": 1}}, "t")
    plan = plan_search(run, base, SearchOptions(trials=1, time_budget=600, recipe=recipe, cv_folds=2, cv_repeats=1))
    plan.objective.cost.trial_seconds = lambda *a, **k: 400.0  # fits in the 600 s left, but is 2/3 of the budget
    monkeypatch.setattr(train_mod, "train_model", lambda *a, **k: pytest.fail("a trial over its budget share was trained"))
    (trial,) = plan.run_trials().study.get_trials(deepcopy=False)
    assert trial.state == TrialState.PRUNED and "150s allowed" in trial.user_attrs["not_started"]
    # every trial of this space is estimated at 400 s: none could ever start, so the study stops at once
    # (a trial the budget kept from starting does not count towards --trials, so it would go on sampling)
    assert "study stops" in trial.user_attrs["not_started"]


def test_trials_start_only_when_their_corrected_estimate_fits_before_the_deadline(data, tmp_path, monkeypatch):
    """A trial's start is judged against the deadline (the overrun allowance is no budget), with the
    start-up estimate scaled by what this run's completed trained trials measured per estimated second."""
    import time

    import autotl.train as train_mod

    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    recipe = parse_recipe({"trials": 3, "pruner": {"type": "none"}, "space": {"frozen_stages": [-1], "epochs": 1,
                                                                             "lr": {"low": 0.001, "high": 0.03}}}, "t")
    plan = plan_search(run, base, SearchOptions(trials=3, time_budget=600, recipe=recipe, cv_folds=2, cv_repeats=1))
    objective = plan.objective
    assert objective.cost_scale() == 1.0  # nothing measured yet: the start-up model as it is
    objective.cost.trial_seconds = lambda *a, **k: 40.0
    trained = []
    real = train_mod.train_model
    monkeypatch.setattr(train_mod, "train_model", lambda *a, **k: trained.append(1) or real(*a, **k))

    # 30 s before the deadline a 40 s trial is not started, though deadline + overrun would hold it
    objective.deadline, objective.budget = time.monotonic() + 30.0, 600.0
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)
    assert study.trials[-1].state == TrialState.PRUNED and not trained
    assert "40s" in study.trials[-1].user_attrs["not_started"]

    # measured trials took 3x their estimates: a 40 s estimate now counts as 120 s and 100 s left do not hold it
    objective.cost_ratios[:] = [2.5, 3.0, 3.5]
    assert objective.cost_scale() == 3.0
    objective.deadline = time.monotonic() + 100.0
    study.optimize(objective, n_trials=1)
    assert study.trials[-1].state == TrialState.PRUNED and not trained
    assert "120s" in study.trials[-1].user_attrs["not_started"]

    # a trained trial's first fold adds its ratio: seconds the folds would take / estimate
    objective.cost_ratios.clear()
    objective.deadline = time.monotonic() + 500.0
    study.optimize(objective, n_trials=1)
    assert study.trials[-1].state == TrialState.COMPLETE and trained
    (ratio,) = objective.cost_ratios
    assert ratio == pytest.approx(study.trials[-1].user_attrs["seconds"] / 40.0, rel=0.5)  # two folds of about equal cost


def test_a_trial_whose_first_folds_say_it_would_end_past_the_deadline_stops(data, tmp_path, monkeypatch):
    import time

    import autotl.train as train_mod

    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "space": {"frozen_stages": [-1], "epochs": 1}}, "t")
    plan = plan_search(run, base, SearchOptions(trials=1, time_budget=600, recipe=recipe, cv_folds=2, cv_repeats=1))
    objective = plan.objective
    objective.cost.trial_seconds = lambda *a, **k: 0.1  # the start-up model thinks it is instant
    real = train_mod.train_model
    calls = []

    def slow(*a, **k):  # each fold takes over a second
        calls.append(1)
        time.sleep(1.2)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "train_model", slow)
    objective.deadline, objective.budget = time.monotonic() + 1.5, 600.0
    study = optuna.create_study(direction="maximize")
    study.optimize(objective, n_trials=1)
    (trial,) = study.trials
    assert trial.state == TrialState.PRUNED and len(calls) == 1  # the second fold never started
    assert objective.cost_ratios and objective.cost_ratios[0] > 10  # 1.2 s+ a fold against 0.05 s estimated


def test_the_baseline_runs_whatever_its_estimate(data, tmp_path):
    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "baselines": [{"frozen_stages": "all"}],
                           "space": {"frozen_stages": ["all", -1], "epochs": 1}}, "t")
    plan = plan_search(run, base, SearchOptions(trials=1, time_budget=5, recipe=recipe, cv_folds=2, cv_repeats=1))
    plan.objective.cost.trial_seconds = lambda *a, **k: 1e6
    (trial,) = plan.run_trials().study.get_trials(deepcopy=False)
    assert trial.state == TrialState.COMPLETE and trial.user_attrs["baseline"]


def test_a_fixed_flag_holds_for_every_trial_portfolio_included(data, tmp_path):
    """``fit(fixed_params=...)`` (a strategy's flag, e.g. ``--taps 0``-like dimensions, ``--dropout-tau``)
    fixes what the recipe would vary: the sampler does not vary it, the portfolio's entries take it
    (entries that become the same run once) and every trial and the refit use it."""
    from autotl._recipe import fix_targets

    recipe = parse_recipe({
        "trials": 4, "pruner": {"type": "none"}, "sampler": {"n_startup_trials": 0},
        "baselines": [{"frozen_stages": "all", "dropout_tau": None}, {"frozen_stages": "all", "dropout_tau": 1.0},
                      {"frozen_stages": "all", "dropout_tau": 2.0}],
        "space": {"frozen_stages": ["all"], "dropout_tau": [None, 1.0, 2.0, 3.0]}}, "t")
    fixed_recipe = fix_targets(recipe, {"dropout_tau": 3.0})
    dim = fixed_recipe.dimension("dropout_tau")
    assert dim.kind == "fixed" and dim.value == 3.0 and dim not in fixed_recipe.searched()
    assert fixed_recipe.baselines == [{"frozen_stages": "all", "dropout_tau": 3.0}]

    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    plan = plan_search(run, base, SearchOptions(trials=4, recipe=recipe, cv_folds=2, cv_repeats=1,
                                                fixed_params={"dropout_tau": 3.0}))
    assert plan.recipe.dimension("dropout_tau").kind == "fixed" and len(plan.recipe.baselines) == 1
    trials = plan.run_trials().study.get_trials(deepcopy=False)
    ran = [t for t in trials if t.state == TrialState.COMPLETE]
    assert ran, [t.user_attrs for t in trials]
    for t in ran:  # what each trial's dropout ran with: the fixed tau, never a sampled or portfolio one
        assert t.user_attrs["strategies"]["dropout"]["tau"] == 3.0
        assert "dropout_tau" not in t.params


def test_trials_the_budget_kept_from_starting_do_not_count_towards_trials(data, tmp_path, monkeypatch):
    """--trials counts trials that measured something: a fine-tune over its share of the budget is not
    started and the study samples on, until the requested number of trials have run."""
    import autotl.train as train_mod
    from autotl.search import finished_trials

    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    recipe = parse_recipe({"trials": 3, "pruner": {"type": "none"}, "sampler": {"n_startup_trials": 50},
                           "space": {"frozen_stages": [-1, "all"], "epochs": 1, "taps": {"choices": [0, 1, 2], "when": {"frozen_stages": "all"}}}}, "t")
    plan = plan_search(run, base, SearchOptions(trials=3, time_budget=600, recipe=recipe, cv_folds=2, cv_repeats=1))
    monkeypatch.setattr("autotl.search._study.schedule_for", lambda *a, **k: None)  # fine-tunes from the start
    # every fine-tune: 2/3 of the budget; a probe: a second
    plan.objective.cost.trial_seconds = lambda label, cfg, params, ex: 400.0 if cfg.frozen_stages < ex.num_stages else 1.0
    monkeypatch.setattr(train_mod, "train_model", lambda *a, **k: pytest.fail("a trial over its budget share was trained"))
    study = plan.run_trials().study
    trials = study.get_trials(deepcopy=False)
    kept = [t for t in trials if t.user_attrs.get("over_budget")]
    assert kept and all(t.state == TrialState.PRUNED and t.params["frozen_stages"] == -1 for t in kept)
    assert len(finished_trials(study)) == 3 and len(trials) == 3 + len(kept)
    assert all(t.params["frozen_stages"] == "all" for t in trials if t not in kept)
