"""Distributed search: workers on other hosts join a study in a shared RDB storage.

``autotl fit DIR --storage postgresql://... --study NAME`` creates the study and stores in its user
attributes everything a worker needs (``worker``: data folder, split, models, base config, the
target number of trials, the artefact folder; ``recipe``: the search space). ``autotl worker
--storage URL --study NAME`` then rebuilds the same objective on its own device and runs trials until
the study has its target number of finished trials (or ``--trials N`` of its own).

Fault tolerance comes from Optuna's heartbeat: a non-SQLite RDB storage is opened with
``heartbeat_interval`` / ``grace_period``; every trial records a heartbeat from a thread, and before
each new trial (``optuna.study._optimize._run_trial``) — and in this module's wait loop —
``optuna.storages.fail_stale_trials`` marks RUNNING trials whose heartbeat is older than the grace
period FAIL and calls ``RetryFailedTrialCallback``, which enqueues a WAITING copy (same params,
``system_attrs["failed_trial"]``) that the next ``study.ask()`` of any worker picks up.

Settings (environment, so that ``fit`` and ``worker`` processes agree without new flags):
``AUTOTL_HEARTBEAT_INTERVAL`` (s, default 60), ``AUTOTL_GRACE_PERIOD`` (s, default 2 × interval),
``AUTOTL_MAX_RETRY`` (default 3).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..errors import AutotlError

WORKER_ATTR = "worker"
ENV_INTERVAL = "AUTOTL_HEARTBEAT_INTERVAL"
ENV_GRACE = "AUTOTL_GRACE_PERIOD"
ENV_RETRY = "AUTOTL_MAX_RETRY"


# --------------------------------------------------------------------------------------- storage
def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise AutotlError(f"{name}={raw!r}: give a whole number of seconds") from None
    if value < 1 and name != ENV_RETRY or value < 0:
        raise AutotlError(f"{name}={raw!r}: must be positive")
    return value


def heartbeat_kwargs() -> dict[str, Any]:
    """``RDBStorage`` keyword arguments: heartbeat, grace period, retry of stale (killed) trials."""
    import inspect

    import optuna

    interval = _env_int(ENV_INTERVAL, 60)
    grace = _env_int(ENV_GRACE, 2 * interval)
    # Optuna >= 4.9 renamed RetryFailedTrialCallback / failed_trial_callback (same behaviour, same system attrs)
    retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = retry_cls(max_retry=_env_int(ENV_RETRY, 3))
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    return {"heartbeat_interval": interval, "grace_period": grace, key: retry}


def uses_heartbeat(url: str) -> bool:
    """Heartbeats for shared RDB servers (postgresql, mysql, ...); not for the run folder's SQLite file."""
    return "://" in url and not url.startswith("sqlite")


def rdb_url(url: str) -> str:
    """``postgresql://`` with the driver that is installed: SQLAlchemy 2.1 defaults to psycopg (3), the
    ``postgres`` extra installs psycopg2."""
    import importlib.util

    if url.startswith(("postgresql://", "postgres://")) and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


# --------------------------------------------------------------------------------------- study attrs
def worker_attrs(run, base, *, target: int, options: dict[str, Any], fixed: dict[str, Any],
                 cv_folds: int, cv_repeats: int | None) -> dict[str, Any]:
    """What a worker needs to rebuild the objective (the study's ``worker`` user attr, plain JSON)."""
    return {
        # a label file's run is rebuilt from the file with the same columns; a folder's from the folder
        "data_dir": str(Path(run.index.source).resolve()),
        "columns": dict((run.index.label_file or {}).get("columns") or {}),
        "val_fraction": float(run.val_fraction),
        "duplicates": run.duplicates,
        "seed": int(run.seed),
        "models": [str(s.spec) for s in run.sources.values()],
        "base": base.to_dict(),
        "options": _plain(options),
        "fixed": _plain(fixed),
        "target": int(target),
        "cv_folds": int(cv_folds),
        "cv_repeats": cv_repeats,
        "artifacts": str((Path(run.run_dir) / "artifacts").resolve()),
    }


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def recipe_from_json(doc: dict[str, Any]):
    """Rebuild a :class:`Recipe` from ``Recipe.to_json()`` (the study's ``recipe`` user attr)."""
    from .._recipe import parse_recipe

    space = {}
    for name, d in doc["space"].items():
        d = dict(d)
        kind = d.pop("type")
        if kind == "model":
            space[name] = {k: d[k] for k in ("top_k", "when") if d.get(k) is not None}
            continue
        if d.get("step") is None:  # a range without a step: absent, or null in the stored JSON
            d.pop("step", None)
        if kind in ("int", "float"):
            d["type"] = kind
        space[name] = d
    out = {"trials": doc.get("trials"), "sampler": doc.get("sampler") or {}, "pruner": doc.get("pruner") or {"type": "median"},
           "baselines": doc.get("baselines") or [], "space": space, "description": doc.get("description") or ""}
    if doc.get("time_budget_s") is not None:
        out["time_budget"] = f"{doc['time_budget_s']}s"
    if out["trials"] is None:
        out.pop("trials")
    return parse_recipe(out, f"study recipe {doc.get('name')!r}", name=doc.get("name"))


# --------------------------------------------------------------------------------------- counting
def retried_numbers(trials) -> set[int]:
    """Numbers of FAIL trials that were re-queued by ``RetryFailedTrialCallback`` (they do not count)."""
    out: set[int] = set()
    for t in trials:
        out.update(int(n) for n in t.system_attrs.get("retry_history", ()))
    return out


INTERRUPTED_ATTR = "interrupted_trials"  # study user attr: numbers of trials failed because they were cut off
OVER_BUDGET = "over_budget"  # trial user attr: the time budget kept it from starting


def interrupted_numbers(study) -> set[int]:
    """Trials cut off by Ctrl-C or a kill: marked on the trial itself when its own process saw the
    interrupt, else (failed afterwards by another process, through Optuna's public ``tell``, which
    cannot write a finished trial's attributes) listed in the study's ``interrupted_trials``."""
    return {int(n) for n in study.user_attrs.get(INTERRUPTED_ATTR, ())}


def is_interrupted(trial, interrupted: set[int]) -> bool:
    return bool(trial.user_attrs.get("interrupted")) or trial.number in interrupted


def counts_towards_trials(trial, interrupted: set[int] = frozenset()) -> bool:
    """Whether a finished trial counts towards ``--trials``: not one cut off by Ctrl-C, nor one the time
    budget kept from starting (it measured nothing)."""
    return not is_interrupted(trial, interrupted) and not trial.user_attrs.get(OVER_BUDGET)


def mark_interrupted(study, numbers) -> None:
    if numbers:
        study.set_user_attr(INTERRUPTED_ATTR, sorted(interrupted_numbers(study) | {int(n) for n in numbers}))


def study_progress(study) -> dict[str, int]:
    """``done`` (complete + pruned + failed, less interrupted/surplus/retried), ``running``, ``waiting``."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried, cut = retried_numbers(trials), interrupted_numbers(study)
    done = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
               and counts_towards_trials(t, cut) and t.number not in retried)
    return {"done": done, "running": sum(t.state == TrialState.RUNNING for t in trials),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials)}


def _surplus(study, trial, target: int) -> bool:
    """Did other workers start the study's last trials between our check and our ``ask``? The lowest
    numbers win: this trial is surplus when the finished trials plus the running ones numbered below it
    already make the target (a re-queued trial of a dead worker is never surplus)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    me = next((t for t in trials if t.number == trial.number), None)
    if me is not None and me.system_attrs.get("failed_trial") is not None:
        return False
    p = study_progress(study)
    before = sum(1 for t in trials if t.state == TrialState.RUNNING and t.number < trial.number
                 and not t.user_attrs.get("surplus"))
    return p["done"] + before >= target


def fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def stop_at_target(target: int):
    """An ``optimize`` callback: stop this process once the shared study has ``target`` finished trials."""

    def callback(study, trial) -> None:
        if study_progress(study)["done"] >= target:
            study.stop()

    return callback
