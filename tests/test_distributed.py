"""Distributed search: workers join a study in a real PostgreSQL server; a killed worker's trial is retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _pg import pg_server, skip_reason

os.environ["HF_HUB_OFFLINE"] = "1"

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from autotl.errors import AutotlError  # noqa: E402
from autotl.run import Run  # noqa: E402
from autotl.search import SearchOptions, parse_recipe, plan_search, run_worker  # noqa: E402
from autotl.search._study import make_storage, open_study  # noqa: E402
from autotl.train import TrainConfig  # noqa: E402

needs_pg = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

MODEL = "test_efficientnet=random"
ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT = {"AUTOTL_HEARTBEAT_INTERVAL": "1", "AUTOTL_GRACE_PERIOD": "3", "AUTOTL_MAX_RETRY": "2"}


@pytest.fixture(scope="module")
def pg():
    with pg_server() as server:
        yield server


@pytest.fixture(autouse=True)
def fast_heartbeat(monkeypatch, single_thread):
    for k, v in HEARTBEAT.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", {"cat": 8, "dog": 8}, splits=["train", "val"], size=(40, 32))


def _recipe(trials: int, frozen=("all", -1)):
    return parse_recipe({"trials": trials, "sampler": {"n_startup_trials": 2}, "pruner": {"type": "none"},
                         "space": {"frozen_stages": list(frozen), "lr": {"low": 0.001, "high": 0.03, "log": True},
                                   "epochs": 2}}, "dist-recipe")


def _create(url: str, name: str, data: Path, tmp_path: Path, target: int, recipe=None):
    """What `autotl fit --storage URL --study NAME` does before its first trial: create the study + worker attrs."""
    run = Run.open(data, tmp_path / f"run-{name}", models=[MODEL], device="cpu")
    plan = plan_search(run, TrainConfig(epochs=2, batch_size=8, objective="accuracy"),
                       SearchOptions(trials=target, recipe=recipe or _recipe(target), storage=url, study=name, cv_folds=2,
                                     cv_repeats=1))
    study, created = open_study(plan.settings, url, fingerprint=plan.fingerprint)
    assert created
    return plan


def _env(**extra) -> dict:
    env = {**os.environ, **HEARTBEAT, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _worker(url: str, name: str, *extra: str, slow: bool = False) -> subprocess.Popen:
    args = ["worker", "--storage", url, "--study", name, "--json", *extra]
    if slow:  # every trial of this worker hangs, so it is surely mid-trial when the test kills it
        code = ("import sys, time, autotl.train as t; t.train_model = lambda *a, **k: time.sleep(600); "
                "from autotl.cli import main; sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "autotl", *args]
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _finish(proc: subprocess.Popen, timeout: float = 150) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"worker {proc.pid} did not finish: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _trials(url: str, name: str):
    return optuna.load_study(study_name=name, storage=make_storage(url)).get_trials(deepcopy=False)


@pytest.mark.slow
@needs_pg
def test_two_workers_complete_the_study(pg, data, tmp_path):
    url = pg.createdb("two")
    plan = _create(url, "s", data, tmp_path, target=6)
    workers = [_worker(url, "s"), _worker(url, "s")]
    docs = [_finish(w) for w in workers]
    trials = _trials(url, "s")
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers))  # no duplicate trial numbers
    counted = [t for t in trials if not t.user_attrs.get("surplus")]
    assert [t.state for t in counted].count(TrialState.COMPLETE) == 6  # no lost trials, none extra
    assert all(d["stopped_by"] == "target" and d["progress"]["done"] == 6 for d in docs)
    ran = sorted(n for d in docs for n in d["trials"])
    assert ran == sorted(t.number for t in counted)  # every trial was run by exactly one of the two workers
    assert all(t.state == TrialState.FAIL for t in trials if t.user_attrs.get("surplus"))  # a lost race, not counted
    assert {t.user_attrs["worker"] for t in trials} == {d["worker_id"] for d in docs if d["trials"]}
    # each trial's summary went to the shared artefact store (default RUN_DIR/artifacts of the creating fit)
    store = plan.run.run_dir / "artifacts"
    assert docs[0]["artifacts"] == str(store.resolve())
    assert len([p for p in store.iterdir() if p.is_file()]) == len(counted)
    metas = optuna.artifacts.get_all_artifact_meta(counted[0], storage=make_storage(url))
    assert metas and metas[0].mimetype == "application/json"


@pytest.mark.slow
@needs_pg
def test_killed_worker_trial_is_retried_by_the_other(pg, data, tmp_path):
    url = pg.createdb("kill")
    _create(url, "k", data, tmp_path, target=3, recipe=_recipe(3, frozen=[-1]))  # fine-tunes only: every trial trains
    doomed = _worker(url, "k", slow=True)
    deadline = time.monotonic() + 90
    running = None
    while running is None:
        assert time.monotonic() < deadline and doomed.poll() is None, doomed.stderr.read() if doomed.poll() is not None else "timeout"
        running = next((t for t in _trials(url, "k") if t.state == TrialState.RUNNING), None)
        time.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    survivor = _finish(_worker(url, "k"))
    trials = {t.number: t for t in _trials(url, "k")}
    killed = trials[running.number]
    assert killed.state == TrialState.FAIL  # failed by the survivor's stale-trial check (no heartbeat)
    retries = [t for t in trials.values() if t.system_attrs.get("failed_trial") == running.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed.params  # the same strategy, re-queued
    assert [t.state for t in trials.values()].count(TrialState.COMPLETE) == 3
    assert survivor["stopped_by"] == "target" and survivor["progress"]["done"] == 3


@pytest.mark.slow
@needs_pg
def test_a_worker_follows_the_family_schedule(pg, data, tmp_path):
    """A worker samples the cheap family alone until the study's trials cover it, as ``run_study`` does
    (its random sampler would draw a fine-tune half the time)."""
    from autotl.search._schedule import stage_of

    url = pg.createdb("sched")
    recipe = parse_recipe({"trials": 12, "sampler": {"n_startup_trials": 1000}, "pruner": {"type": "none"},
                           "space": {"frozen_stages": ["all", -1], "epochs": 1,
                                     "taps": {"choices": [0, 1], "when": {"frozen_stages": "all"}}}}, "sched-recipe")
    _create(url, "f", data, tmp_path, target=12, recipe=recipe)
    _finish(_worker(url, "f"))
    trials = sorted(_trials(url, "f"), key=lambda t: t.number)
    first = next((t.number for t in trials if t.params["frozen_stages"] != "all"), len(trials))
    assert first >= 8 and not stage_of(trials[:first]).cheap_only or first == len(trials)


@pytest.mark.slow
@needs_pg
def test_fit_creates_study_a_worker_joins_and_refusals(pg, data, tmp_path, make_image_folder, capsys):
    from autotl.cli import main

    url = pg.createdb("fit")
    run = tmp_path / "run"
    args = ["fit", str(data), "--out", str(run), "--model", MODEL, "--storage", url, "--study", "viafit", "--trials", "2",
            "--epochs", "1", "--batch-size", "8", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    # the target reached; portfolio entries past it stay enqueued (WAITING), for a later --trials or a worker
    states = doc["search"]["states"]
    assert doc["search"]["storage"] == url and states["complete"] == 2 and set(states) <= {"complete", "waiting"}
    w = optuna.load_study(study_name="viafit", storage=make_storage(url)).user_attrs["worker"]
    assert w["data_dir"] == str(data.resolve()) and w["target"] == 2 and w["models"] == [MODEL]
    # the study is done: a worker joins and leaves at once, without running a trial
    res = run_worker(url, "viafit", out=tmp_path / "w", cache_dir=tmp_path / "cache")
    assert res.stopped_by == "target" and res.trials == []
    with pytest.raises(AutotlError, match="no such study"):
        run_worker(url, "nonesuch")
    other = make_image_folder(tmp_path / "other", {"cat": 8, "dog": 9}, splits=["train", "val"], size=(40, 32))
    with pytest.raises(AutotlError, match="differs from the data"):
        run_worker(url, "viafit", data_dir=other)
    assert main(["worker", "--storage", url, "--study", "nonesuch"]) == 2
    assert "no such study" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- no server needed
def test_recipe_round_trips_through_the_study_attrs():
    from autotl.search import load_recipe, recipe_from_json

    for name in ("quick", "default", "thorough"):
        recipe = load_recipe(name)
        assert recipe_from_json(json.loads(json.dumps(recipe.to_json()))).fingerprint() == recipe.fingerprint()


def test_racing_last_trial_lowest_number_wins(tmp_path):
    from autotl.search._distributed import _surplus, heartbeat_kwargs, rdb_url, study_progress

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    for _ in range(5):
        study.tell(study.ask(), 1.0)
    a, b = study.ask(), study.ask()  # two workers ask for the 6th of 6 trials at the same moment
    assert (_surplus(study, a, 6), _surplus(study, b, 6)) == (False, True)
    assert (_surplus(study, a, 7), _surplus(study, b, 7)) == (False, False)
    study.tell(a, state=TrialState.FAIL)
    study.add_trial(optuna.create_trial(state=TrialState.FAIL, system_attrs={"retry_history": [5]}))
    assert study_progress(study)["done"] == 6  # the re-queued FAIL of trial 5 does not count, its copy does
    kw = heartbeat_kwargs()
    assert (kw["heartbeat_interval"], kw["grace_period"]) == (1, 3)
    assert rdb_url("sqlite:///x.db") == "sqlite:///x.db"
