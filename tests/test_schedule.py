"""The family schedule: the cheap family until it is covered, fine-tunes on evidence, a stop when the
sampler only repeats itself."""

from __future__ import annotations

import datetime as dt

import optuna
import pytest
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState, create_trial

from autotl.options import SearchOptions
from autotl.run import Run
from autotl.search import _schedule
from autotl.search._fit import plan_search
from autotl.search._schedule import COVERED_AFTER, REPEAT_WINDOW, STOP_REPEATS, stage_of
from autotl._recipe import parse_recipe
from autotl.train import TrainConfig

MODEL = "test_efficientnet=random"
T0 = dt.datetime(2026, 1, 1)


class _Trials:
    """A study's trials, made one after another."""

    def __init__(self):
        self.trials: list = []

    def add(self, frozen, value=None, *, seconds=0.5, repeat=False, state=None, baseline=False):
        attrs = {"not_started": "the same parameters as trial 0"} if repeat else {}
        attrs.update({"baseline": True} if baseline else {})
        state = state or (TrialState.PRUNED if repeat or value is None else TrialState.COMPLETE)
        t = create_trial(state=state, value=value if state == TrialState.COMPLETE else None,
                         params={"frozen_stages": frozen},
                         distributions={"frozen_stages": CategoricalDistribution(["all", -1])},
                         user_attrs=attrs)
        t.number = len(self.trials)
        t.datetime_start, t.datetime_complete = T0, T0 + dt.timedelta(seconds=seconds)
        self.trials.append(t)
        return self

    def stage(self):
        return stage_of(self.trials)


def test_the_cheap_family_alone_until_the_sampler_stops_improving_it():
    trials = _Trials().add("all", 0.7, baseline=True)
    for _ in range(COVERED_AFTER + 2):  # the portfolio's entries are not the sampler's refinements
        trials.add("all", 0.6, baseline=True)
    assert trials.stage().cheap_only
    trials.add("all", 0.5).add("all", 0.8).add("all", 0.9)
    for _ in range(COVERED_AFTER - 1):
        trials.add("all", 0.6)
    assert trials.stage().kind == "uncovered" and trials.stage().cheap_only  # one short
    trials.add("all", repeat=True)  # a repeated configuration found nothing better either
    stage = trials.stage()
    assert stage.kind == "share" and not stage.cheap_only and not stage.stop
    trials.add("all", 0.95)  # covered stays covered
    assert not trials.stage().cheap_only


def _covered() -> _Trials:
    trials = _Trials().add("all", 0.8, seconds=10.0)
    for _ in range(COVERED_AFTER):
        trials.add("all", 0.7, seconds=10.0)
    return trials  # 90 s in trials


def test_fine_tunes_keep_their_place_only_within_their_share_of_the_time_or_on_evidence():
    trials = _covered().add(-1, 0.6, seconds=4.0)  # 4 of 94 s
    assert not trials.stage().cheap_only
    trials.add(-1, seconds=6.0)  # a pruned or not-started fine-tune took time too: 10 of 100 s
    stage = trials.stage()
    assert stage.kind == "cheap" and stage.cheap_only and not stage.stop and "none beat" in stage.why
    for _ in range(3):  # probes add time: the share has room again
        trials.add("all", 0.7, seconds=10.0)
    assert not trials.stage().cheap_only

    won = _covered().add(-1, 0.85, seconds=100.0)
    assert won.stage().kind == "evidence" and not won.stage().cheap_only  # a fine-tune beat the best probe


def test_on_the_cheap_family_alone_the_study_stops_when_the_sampler_mostly_repeats():
    trials = _covered().add(-1, 0.5, seconds=20.0)
    for _ in range(STOP_REPEATS - 1):
        trials.add("all", repeat=True, seconds=0.1)
    for _ in range(REPEAT_WINDOW - STOP_REPEATS + 1):  # new measurements push those repeats out of the window
        trials.add("all", 0.75, seconds=0.1)
    for _ in range(STOP_REPEATS - 1):
        trials.add("all", repeat=True, seconds=0.1)
    assert not trials.stage().stop  # STOP_REPEATS - 1 of the last REPEAT_WINDOW
    trials.add("all", repeat=True, seconds=0.1)
    stage = trials.stage()
    assert stage.stop and stage.cheap_only and stage.kind == "converged"

    open_to_tunes = _covered()  # no fine-tune has run: they have their share, no stop
    for _ in range(REPEAT_WINDOW):
        open_to_tunes.add("all", repeat=True)
    assert not open_to_tunes.stage().stop and not open_to_tunes.stage().cheap_only


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", {"cat": 8, "dog": 8}, splits=["train", "val"], size=(40, 32))


def _plan(data, tmp_path, *, trials, budget=None):
    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    base = TrainConfig(epochs=1, batch_size=8, objective="accuracy")
    # a random sampler draws a fine-tune half the time: only the schedule keeps them out early
    recipe = parse_recipe({"trials": trials, "pruner": {"type": "none"}, "sampler": {"n_startup_trials": 1000},
                           "space": {"frozen_stages": ["all", -1], "epochs": 1,
                                     "taps": {"choices": [0, 1], "when": {"frozen_stages": "all"}}}}, "t")
    return plan_search(run, base, SearchOptions(trials=trials, time_budget=budget, recipe=recipe, cv_folds=2, cv_repeats=1))


@pytest.mark.usefixtures("single_thread")
def test_a_search_starts_no_fine_tune_before_the_cheap_family_is_covered(data, tmp_path, monkeypatch):
    monkeypatch.setattr(_schedule, "COVERED_AFTER", 3)
    outcome = _plan(data, tmp_path, trials=12).run_trials()
    trials = sorted(outcome.study.get_trials(deepcopy=False), key=lambda t: t.number)
    tunes = [t.number for t in trials if t.params["frozen_stages"] != "all"]
    assert tunes, "no fine-tune was sampled after the cheap family was covered"
    assert not stage_of(trials[:tunes[0]]).cheap_only  # the trials before the first fine-tune covered the cheap family
    assert [c["stage"] for c in outcome.schedule[:2]] == ["uncovered", "share"]


@pytest.mark.usefixtures("single_thread")
def test_a_search_that_only_repeats_itself_stops_and_says_why(data, tmp_path, monkeypatch):
    monkeypatch.setattr(_schedule, "COVERED_AFTER", 2)
    monkeypatch.setattr(_schedule, "FINETUNE_SHARE", 0.0)  # no share: fine-tunes never open
    monkeypatch.setattr(_schedule, "STOP_REPEATS", 2)
    outcome = _plan(data, tmp_path, trials=40, budget=600).run_trials()
    trials = outcome.study.get_trials(deepcopy=False)
    assert outcome.stopped_by == "converged" and len(trials) < 40
    assert all(t.params["frozen_stages"] == "all" for t in trials)
    assert outcome.schedule[-1]["stage"] == "converged" and "repeated measured configurations" in outcome.schedule[-1]["why"]
