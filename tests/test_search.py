"""Strategy search: recipes, the study (resume, Ctrl-C, failing trials), the trial cache, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import autotl.train  # noqa: E402
from autotl.data import scan_dataset  # noqa: E402
from autotl.errors import AutotlError  # noqa: E402
from autotl.run import Run  # noqa: E402
from autotl.search._distributed import interrupted_numbers, is_interrupted  # noqa: E402
from autotl.search import (  # noqa: E402
    SearchInterrupted,
    list_recipes,
    load_recipe,
    parse_duration,
    parse_recipe,
    SearchOptions,
    plan_search,
    plan_selection,
    resolve_frozen_relative,
)
from autotl.strategy import STRATEGIES, BaseStrategy  # noqa: E402
from autotl.train import TrainConfig  # noqa: E402

MODEL = "test_efficientnet=random"

SPACE = {  # trained trials (solved probes call no training loop: tests/test_probe.py)
    "frozen_stages": [-1, -2],
    "lr": {"low": 0.001, "high": 0.03, "log": True},
    "regularizer": {"choices": ["none", "l2sp"]},
    "reg_lambda": {"low": 0.001, "high": 0.1, "log": True, "when": {"regularizer": "l2sp"}},
    "epochs": 1,
}


def _recipe(**space):
    return parse_recipe({"trials": 2, "sampler": {"n_startup_trials": 2}, "pruner": {"type": "none"},
                         "space": {**SPACE, **space}}, "test-recipe")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", {"cat": 8, "dog": 8}, splits=["train", "val"], size=(40, 32))


FOLDS = 2  # cross-validation folds per trial in these tests (one partition): train_model runs twice a trial


def _plan(data, tmp_path, *, trials=2, resume=False, recipe=None, **kw):
    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    return plan_search(run, base, SearchOptions(trials=trials, recipe=recipe or _recipe(), resume=resume, cv_folds=FOLDS,
                                                cv_repeats=1, **kw))


def _trials(plan_or_study):
    study = getattr(plan_or_study, "study", plan_or_study)
    return study.get_trials(deepcopy=False)


class _FailOn:
    """Wrap train_model: raise ``exc`` on the ``at``-th call (1-based)."""

    def __init__(self, at: int, exc: BaseException):
        self.at, self.exc, self.calls = at, exc, 0
        self.real = autotl.train.train_model

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.exc
        return self.real(*args, **kwargs)


# ----------------------------------------------------------------------------------------- recipes
def test_parse_duration():
    assert parse_duration("90s") == 90
    assert parse_duration("20m") == 1200
    assert parse_duration("1h") == 3600
    assert parse_duration("1h30m") == 5400
    assert parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    assert parse_duration(30) == 30
    for bad in ("abc", "0s", "10x", "m", "-5m"):
        with pytest.raises(AutotlError, match="--time-budget"):
            parse_duration(bad)


def test_builtin_recipes():
    names = list_recipes()
    assert {"quick", "default", "thorough"} <= set(names)
    default = load_recipe("default")
    targets = {d.target for d in default.dimensions}
    assert {"model", "frozen_stages", "lr", "epochs", "regularizer", "reg_lambda", "reg_beta", "reg_decay", "dtnh"} <= targets
    assert default.trials == 100 and default.baselines
    assert load_recipe(names["quick"]).name == "quick"  # by path too
    assert load_recipe("thorough").pruner["type"] == "hyperband"
    with pytest.raises(AutotlError, match="no such built-in recipe"):
        load_recipe("nonesuch")


def test_frozen_relative():
    assert resolve_frozen_relative("all", 7) == 7
    assert resolve_frozen_relative(-1, 7) == 6
    assert resolve_frozen_relative(-10, 7) == 0  # clamped: everything trainable
    assert resolve_frozen_relative(3, 7) == 3
    assert resolve_frozen_relative(10, 7) == 7


@pytest.mark.parametrize("space, match", [
    ({"dropout_taux": [1, 2]}, "unknown dimension 'dropout_taux'"),
    ({"objective": ["accuracy", "macro_f1"]}, "objective is chosen by --objective"),
    ({"frozen_stages": ["all", "half"]}, "frozen_stages value 'half'"),
    ({"lr": {"low": 0.1, "high": 0.01}}, "must be below"),
    ({"lr": {"low": 0.0, "high": 0.1, "log": True}}, "log range needs low > 0"),
    ({"regularizer": ["none", "l1"]}, "regularizer value 'l1'"),
    ({"epochs": {"low": 1.5, "high": 3}}, "integer bounds"),
    ({"dtnh": {"choices": [False, True], "when": {"later": 1}}, "later": 1}, "not a dimension declared before"),
    ({"reg_lambda": {"low": 0.01, "high": 0.1, "when": {"regularizer": "kd"}}}, "can never be taken"),
    ({"lr": {"low": 0.001, "high": 0.1, "colour": "red"}}, "unknown key"),
    ({"lr2": {"param": "lr", "low": 0.001, "high": 0.1}}, "sets 'lr' like space.lr"),
    ({"model": {"top_k": 0}}, "top_k must be a positive integer"),
    ({"epochs": "three"}, "epochs needs a int value"),
])
def test_recipe_validation_errors(space, match):
    with pytest.raises(AutotlError, match=match):
        _recipe(**space)


def test_recipe_top_level_errors(tmp_path):
    with pytest.raises(AutotlError, match="pruner.type"):
        parse_recipe({"pruner": {"type": "asha"}, "space": SPACE})
    with pytest.raises(AutotlError, match="unknown top-level"):
        parse_recipe({"trails": 3, "space": SPACE})
    with pytest.raises(AutotlError, match="outside the dimension's range"):
        parse_recipe({"baselines": [{"lr": 5.0}], "space": SPACE})
    bad = tmp_path / "bad.yaml"
    bad.write_text("space: [unclosed\n")
    with pytest.raises(AutotlError, match="not valid YAML"):
        load_recipe(bad)


def test_conditional_and_shared_target_sampling():
    recipe = parse_recipe({"space": {
        "frozen_stages": ["all", -1],
        "probe_lr": {"param": "lr", "low": 0.01, "high": 0.1, "when": {"frozen_stages": "all"}},
        "tune_lr": {"param": "lr", "low": 0.0001, "high": 0.001, "when": {"frozen_stages": {"not": "all"}}},
        "regularizer": {"choices": ["none", "l2sp"], "when": {"frozen_stages": -1}},
        "reg_lambda": {"low": 0.001, "high": 0.1, "log": True, "when": {"regularizer": "l2sp"}},
        "batch_size": 32,
    }})
    probe = recipe.sample(optuna.trial.FixedTrial({"frozen_stages": "all", "probe_lr": 0.05}), ["m"])
    assert probe == {"frozen_stages": "all", "lr": 0.05, "batch_size": 32, "model": "m"}
    tune = recipe.sample(optuna.trial.FixedTrial({"frozen_stages": -1, "tune_lr": 0.0005, "regularizer": "none"}), ["m"])
    assert tune["lr"] == 0.0005 and tune["regularizer"] == "none" and "reg_lambda" not in tune
    reg = recipe.params_of({"frozen_stages": -1, "tune_lr": 0.0005, "regularizer": "l2sp", "reg_lambda": 0.01}, ["m"])
    assert reg["reg_lambda"] == 0.01 and reg["batch_size"] == 32
    assert recipe.frozen_values("all") == ["all", -1]


# ----------------------------------------------------------------------------------------- strategies join
class _Tagger(BaseStrategy):
    """A test strategy: records its parameter, and keeps half of the training images when tag > 0."""

    name = "tagger"
    params = ("tag",)

    def is_active(self, params):
        return params.get("tag", 0) > 0

    def apply(self, ctx, params):
        ctx.train_samples = ctx.train_samples[::2]
        ctx.notes[self.name] = {"tag": params["tag"], "kept": len(ctx.train_samples)}


@pytest.fixture
def tagger(monkeypatch):
    monkeypatch.setitem(STRATEGIES, "tagger", f"{__name__}:_Tagger")


def test_strategy_params_join_the_space(tagger):
    recipe = _recipe(tag=[0, 1])
    assert recipe.dimension("tag").target == "tag"


# ----------------------------------------------------------------------------------------- the study
def test_search_cache_strategies_and_resume(data, tmp_path, tagger):
    plan = _plan(data, tmp_path, trials=2, recipe=_recipe(tag=[0, 1]))
    cuts = plan.prefetch["cuts"]["test_efficientnet"]
    n_stages = plan.run.extractors["test_efficientnet"].num_stages
    assert cuts == sorted(resolve_frozen_relative(c, n_stages) for c in SPACE["frozen_stages"])  # every cut the space reads
    extractor = plan.run.extractors["test_efficientnet"].extractor
    before = extractor.forward_batches
    out = plan.run_trials()
    trials = _trials(out)
    assert [t.number for t in trials] == [0, 1] and all(t.state == TrialState.COMPLETE for t in trials)
    # the prefix was computed once, before the trials: no trial pushed a batch through the backbone,
    # not even one training on a subset chosen by a strategy
    assert extractor.forward_batches == before
    assert [t.user_attrs["forward_batches"] for t in trials] == [0, 0]
    assert all(t.user_attrs["cached"] for t in trials)
    assert all(len(t.intermediate_values) == FOLDS for t in trials)  # per-fold reports (what the pruner sees)
    for t in trials:
        if t.params.get("tag"):
            # the strategy's half of a fold's training images is what trained
            kept = t.user_attrs["strategies"]["tagger"]["kept"]
            halves = {-(-len(f.train) // 2) for f in plan.objective.selection.folds}
            assert t.user_attrs["n_train"] == kept and kept in halves
    assert (tmp_path / "run" / "study.db").is_file()

    # resume: the same study, numbers continue, no duplicates
    again = _plan(data, tmp_path, trials=4, resume=True, recipe=_recipe(tag=[0, 1])).run_trials()
    numbers = [t.number for t in _trials(again)]
    assert numbers == [0, 1, 2, 3]
    assert again.study._study_id == out.study._study_id and not again.created

    # nothing left to do: returns at once
    done = _plan(data, tmp_path, trials=4, resume=True, recipe=_recipe(tag=[0, 1])).run_trials()
    assert done.stopped_by == "already_done" and len(_trials(done)) == 4

    # the study exists: a fresh start in the same place is refused, so is another recipe on resume
    with pytest.raises(AutotlError, match="already exists.*--resume"):
        _plan(data, tmp_path, trials=5, recipe=_recipe(tag=[0, 1])).run_trials()
    with pytest.raises(AutotlError, match="search space differs"):
        _plan(data, tmp_path, trials=5, resume=True).run_trials()


def test_failing_trial_does_not_end_the_study(data, tmp_path, monkeypatch):
    # the first fold of the second trial fails
    monkeypatch.setattr(autotl.train, "train_model", _FailOn(FOLDS + 1, FloatingPointError("non-finite training loss")))
    out = _plan(data, tmp_path, trials=3).run_trials()
    states = [t.state for t in _trials(out)]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "FloatingPointError" in _trials(out)[1].user_attrs["error"]


def test_keyboard_interrupt_then_resume(data, tmp_path, monkeypatch):
    monkeypatch.setattr(autotl.train, "train_model", _FailOn(FOLDS + 1, KeyboardInterrupt()))
    plan = _plan(data, tmp_path, trials=3)
    with pytest.raises(SearchInterrupted) as info:
        plan.run_trials()
    assert isinstance(info.value, KeyboardInterrupt) and info.value.finished == 1
    study = optuna.load_study(study_name="autotl", storage=plan.url)
    t0, t1 = study.get_trials(deepcopy=False)
    assert t0.state == TrialState.COMPLETE
    assert t1.state == TrialState.FAIL and t1.user_attrs["interrupted"]

    study.ask()  # a trial left RUNNING, as by a process killed with SIGKILL
    monkeypatch.undo()
    again = _plan(data, tmp_path, trials=3, resume=True).run_trials()
    trials = _trials(again)
    assert [t.number for t in trials] == [0, 1, 2, 3, 4]  # interrupted trials do not count
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 3
    assert trials[2].state == TrialState.FAIL and is_interrupted(trials[2], interrupted_numbers(again.study))


def test_resume_refused_when_data_changed(data, tmp_path, make_image_folder):
    _plan(data, tmp_path, trials=1).run_trials()
    make_image_folder(tmp_path / "more", {"cat": 1}, size=(40, 32), seed=7)
    (tmp_path / "more" / "cat" / "cat_000.png").rename(data / "train" / "cat" / "extra.png")
    with pytest.raises(AutotlError, match="data changed"):
        _plan(data, tmp_path, trials=2, resume=True).run_trials()


def test_resume_without_study_is_refused(data, tmp_path):
    with pytest.raises(AutotlError, match="no study"):
        _plan(data, tmp_path, trials=2, resume=True).run_trials()


def test_storage_url_and_journal(data, tmp_path):
    journal = tmp_path / "elsewhere" / "study.log"
    out = _plan(data, tmp_path, trials=1, storage=f"journal:{journal}", study="mine").run_trials()
    assert journal.is_file() and out.study_name == "mine" and len(_trials(out)) == 1
    with pytest.raises(AutotlError, match="--storage"):
        _plan(data, tmp_path, trials=1, storage="not-a-url").run_trials()


# ----------------------------------------------------------------------------------------- CLI
def test_cli_interrupt_resume_and_json(data, tmp_path, monkeypatch, capsys):
    from autotl.cli import main

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "trials: 2\nsampler: {n_startup_trials: 2}\npruner: {type: median, n_startup_trials: 1}\n"
        "baselines:\n  - {frozen_stages: -1, lr: 0.003}\n"
        "space:\n  frozen_stages: [-1, -2]\n  lr: {low: 0.001, high: 0.03, log: true}\n  epochs: 2\n"
    )
    run = tmp_path / "run"
    args = ["fit", str(data), "--out", str(run), "--model", MODEL, "--recipe", str(recipe), "--batch-size", "8",
            "--cache-dir", str(tmp_path / "cache"), "--cv-folds", str(FOLDS)]
    per_trial = len(plan_selection(scan_dataset(data), k=FOLDS).folds)

    monkeypatch.setattr(autotl.train, "train_model", _FailOn(per_trial + 1, KeyboardInterrupt()))
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "resume with: autotl fit" in err and "--resume" in err and str(run) in err
    monkeypatch.undo()

    assert main(args + ["--resume", "--json", "--time-budget", "10m"]) == 0
    doc = json.loads(capsys.readouterr().out)
    s = doc["search"]
    assert s["study_name"] == "autotl" and s["storage"] == f"sqlite:///{run.resolve() / 'study.db'}"
    assert s["objective"] == "accuracy" and s["resumed"] is True and s["recipe"] == "tiny" and s["time_budget_s"] == 600
    assert s["states"] == {"complete": 2, "fail": 1}
    assert [r["number"] for r in s["leaderboard"]][-1] == 1  # the interrupted trial sorts last
    assert {"number", "state", "value", "params", "seconds", "cached", "description"} <= set(s["leaderboard"][0])
    assert s["best"]["params"]["frozen_stages"] in (-1, -2)
    # the one-standard-error rule: the selected trial is within one SE of the best mean
    rule = s["selection_rule"]
    assert rule["selected"] == s["best"]["number"] and s["best"]["value"] >= rule["bar"] - 1e-12
    assert rule["best_mean"] == max(r["value"] for r in s["leaderboard"] if r["state"] == "COMPLETE")
    # val/ scores alone only when its labels are measurably cleaner; here both splits are clean: every image scores
    assert s["best"]["n_folds"] == per_trial and s["selection"]["kind"] == "cv"
    assert s["leaderboard"][0]["baseline"] or s["leaderboard"][1]["baseline"]  # the enqueued plain-fit strategy ran
    assert set(doc["metrics"]) == {"val"} and doc["parity"]["passed"]
    assert Path(doc["model_path"]).is_file() and (run / "leaderboard.json").is_file()
    assert (run / "plots" / "history.html").is_file()
    card = json.loads((run / "model.json").read_text())
    assert card["extra"]["search"]["best"]["params"] == s["best"]["params"]
    assert card["extra"]["search"]["storage"] == s["storage"]
    decided = card["extra"]["decided_by"]
    assert decided["training"].startswith("all labelled images") and "accuracy" in decided["trial_selection"]
    assert "cross-validation over all labelled images" in decided["trial_selection"]
    assert "no test split" in decided["test"]


def test_cli_search_errors(data, tmp_path, capsys):
    from autotl.cli import main

    assert main(["fit", str(data), "--out", str(tmp_path / "r"), "--recipe", "nonesuch"]) == 2
    assert "no such built-in recipe" in capsys.readouterr().err
    assert main(["fit", str(data), "--out", str(tmp_path / "r"), "--trials", "3", "--time-budget", "soon"]) == 2
    assert "--time-budget 'soon'" in capsys.readouterr().err


def _sampled_params(tmp_path: Path, name: str, shared: bool, reads: list) -> list[dict]:
    """Twenty trials of the default recipe's space on a fixed synthetic objective, sampled by the study's
    TPE; ``reads`` counts the storage's trial reads."""
    from autotl._recipe import load_recipe
    from autotl.search._study import make_sampler

    recipe = load_recipe("default")
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / name}.db")
    real = storage._get_trials

    def counted(*args, **kwargs):
        reads.append(1)
        return real(*args, **kwargs)

    storage._get_trials = counted
    study = optuna.create_study(storage=storage, direction="maximize",
                                sampler=make_sampler(recipe, seed=3, n_existing=0, shared=shared))

    def objective(trial):
        params = recipe.sample(trial, ["m0", "m1"])
        return float(len(json.dumps(params, sort_keys=True, default=str)) % 7)  # a deterministic landscape

    study.optimize(objective, n_trials=20)
    return [t.params for t in study.trials]


def test_a_study_of_one_process_samples_as_the_constant_liar_does_with_less_storage_traffic(tmp_path):
    """The liar matters only where other processes run trials; alone it proposes the same points."""
    alone, shared = [], []
    assert _sampled_params(tmp_path, "alone", False, alone) == _sampled_params(tmp_path, "shared", True, shared)
    assert len(alone) < len(shared)
