"""Distributed search: workers on other hosts join a study in a shared RDB storage (issue 7).

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

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _console
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
        "data_dir": str(Path(run.index.root).resolve()),
        "val_fraction": float(run.val_fraction),
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
    from ._recipe import parse_recipe

    space = {}
    for name, d in doc["space"].items():
        d = dict(d)
        kind = d.pop("type")
        if kind == "model":
            space[name] = {"top_k": d["top_k"]} if d.get("top_k") is not None else {}
            continue
        if kind in ("fixed", "categorical"):
            pass
        elif d.get("step") is None:
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


def study_progress(study) -> dict[str, int]:
    """``done`` (complete + pruned + failed, less interrupted/surplus/retried), ``running``, ``waiting``."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    done = sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
               and not t.user_attrs.get("interrupted") and t.number not in retried)
    return {"done": done, "running": sum(t.state == TrialState.RUNNING for t in trials),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
            "complete": sum(t.state == TrialState.COMPLETE for t in trials)}


def _surplus(study, trial, target: int) -> bool:
    """Did other workers start the study's last trials between our check and our ``ask``? The lowest
    numbers win: this trial is surplus when the finished trials plus the running ones numbered below it
    already make the target (a re-queued trial of a dead worker is never surplus)."""
    from optuna.trial import TrialState

    if study._storage.get_trial(trial._trial_id).system_attrs.get("failed_trial") is not None:
        return False
    p = study_progress(study)
    before = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                 if t.number < trial.number and not t.user_attrs.get("surplus"))
    return p["done"] + before >= target


def fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


# --------------------------------------------------------------------------------------- worker
@dataclass
class WorkerResult:
    study_name: str
    storage: str
    worker_id: str
    trials: list[int] = field(default_factory=list)  # trial numbers this worker ran
    stopped_by: str = "target"  # "target" | "own_trials"
    progress: dict[str, int] = field(default_factory=dict)
    artifacts: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"study_name": self.study_name, "storage": self.storage, "worker_id": self.worker_id,
                "trials": self.trials, "stopped_by": self.stopped_by, "progress": self.progress,
                "artifacts": self.artifacts, "seconds": round(self.seconds, 2)}


def load_worker_study(url: str, study_name: str):
    """The study and its ``worker`` attrs, or an AutotlError saying what is missing."""
    import optuna

    from ._study import make_storage, quiet_optuna

    storage = make_storage(url)
    with quiet_optuna():
        names = optuna.get_all_study_names(storage)
        if study_name not in names:
            raise AutotlError(f"--study {study_name}: no such study in {url} (studies there: {', '.join(names) or 'none'}); "
                              "create it first with `autotl fit DIR --storage URL --study NAME --trials N`")
        study = optuna.load_study(study_name=study_name, storage=storage)
    attrs = study.user_attrs
    if WORKER_ATTR not in attrs or "recipe" not in attrs:
        raise AutotlError(f"--study {study_name}: this study in {url} was not created by `autotl fit` with a search "
                          "(no worker settings in its user attributes)")
    return study, attrs


def run_worker(storage: str, study_name: str, *, data_dir: str | os.PathLike | None = None, trials: int | None = None,
               artifacts: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
               device: str | None = "auto", cache_dir: str | os.PathLike | None = None,
               poll: float | None = None) -> WorkerResult:
    """Join study ``study_name`` in ``storage`` and run trials until it has its target (or ``trials`` of our own)."""
    import optuna
    from optuna.artifacts import FileSystemArtifactStore

    from ..data import scan_dataset
    from ..run import Run
    from ..train import TrainConfig
    from ._fit import _log_trial, plan_search
    from ._objective import TrialFailed
    from ._study import make_sampler, open_study, quiet_optuna

    start = time.monotonic()
    if trials is not None and trials < 1:
        raise AutotlError(f"--trials {trials}: give at least 1")
    url = str(storage)
    probe, attrs = load_worker_study(url, study_name)
    w = attrs[WORKER_ATTR]
    data = Path(data_dir) if data_dir is not None else Path(w["data_dir"])
    if not data.is_dir():
        raise AutotlError(f"--data {data}: not a folder on this host; give the study's data folder "
                          f"(created from {w['data_dir']}) with --data")
    index = scan_dataset(data, val_fraction=w["val_fraction"], seed=w["seed"])
    if index.fingerprint() != attrs.get("data_fingerprint"):
        raise AutotlError(f"--data {data}: differs from the data study {study_name!r} was created with "
                          "(files added, removed, edited or re-split); give the same data folder")
    recipe = recipe_from_json(attrs["recipe"])
    base = TrainConfig(**w["base"])
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    run_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"autotl-worker-{study_name}-"))
    run = Run.open(data, run_dir, models=w["models"], val_fraction=w["val_fraction"], seed=w["seed"], device=device,
                   cache_dir=cache_dir, index=index)
    plan = plan_search(run, base, trials=w["target"], recipe=recipe, resume=True, storage=url, study_name=study_name,
                       fixed=w["fixed"], options=w["options"], cv_folds=w["cv_folds"], cv_repeats=w["cv_repeats"])
    study, _ = open_study(plan.settings, url, fingerprint=plan.fingerprint)
    # every worker proposes from its own seed (the same seed in two workers would replay the same trials)
    study.sampler = make_sampler(recipe, w["seed"] + os.getpid() * 7919 + time.time_ns() % 100_003,
                                 len(study.get_trials(deepcopy=False)))
    target = int(w["target"])
    art_dir = Path(artifacts) if artifacts is not None else Path(w["artifacts"])
    art_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(art_dir))
    objective = plan.objective
    poll = poll if poll is not None else max(0.2, min(5.0, heartbeat_kwargs()["heartbeat_interval"] / 2))

    def guarded(trial):
        trial.set_user_attr("worker", worker_id)
        if _surplus(study, trial, target):
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("surplus", True)
            raise TrialFailed("surplus trial: the study reached its target while this one started")
        outcome: dict[str, Any] = {"outcome": "error", "value": None}
        try:
            outcome["value"] = objective(trial)
            outcome["outcome"] = "complete"
            return outcome["value"]
        except optuna.TrialPruned:
            outcome["outcome"] = "pruned"
            raise
        finally:
            if outcome["outcome"] != "error" or not isinstance(sys.exc_info()[1], KeyboardInterrupt):
                upload(trial, outcome)

    def upload(trial, outcome: dict[str, Any]) -> None:
        """The trial's summary to the shared artefact store (while the trial still runs: Optuna links it then)."""
        summary = {"number": trial.number, **outcome, "params": trial.params, "user_attrs": trial.user_attrs,
                   "worker": worker_id}
        tmp = run_dir / f"trial-{trial.number}.json"
        try:
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            optuna.artifacts.upload_artifact(artifact_store=store, file_path=str(tmp), study_or_trial=trial,
                                             mimetype="application/json")
        except Exception as exc:  # noqa: BLE001 - a full artefact disk must not lose the trial
            _console.log(f"[yellow]could not upload the artefact of trial {trial.number}: {type(exc).__name__}: {exc}[/]")
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    result = WorkerResult(study_name, url, worker_id, artifacts=str(art_dir))
    _console.log(f"worker {worker_id} joined study {study_name!r} in {url}: target {target} trial(s)"
                 + (f", at most {trials} of its own" if trials else ""))
    log_cb = _log_trial(base.objective)
    while True:
        if trials is not None and len(result.trials) >= trials:
            result.stopped_by = "own_trials"
            break
        fail_stale(study)
        p = study_progress(study)
        if p["done"] >= target:
            result.stopped_by = "target"
            break
        if p["done"] + p["running"] >= target and not p["waiting"]:
            time.sleep(poll)  # the last trials run elsewhere; take over if one of them goes stale
            continue
        n_before = len(objective.started)
        with quiet_optuna():
            study.optimize(guarded, n_trials=1, catch=(TrialFailed,), callbacks=[log_cb])
        result.trials += objective.started[n_before:]
    result.progress = study_progress(study)
    result.seconds = time.monotonic() - start
    _console.log(f"worker {worker_id} done ({result.stopped_by}): ran {len(result.trials)} trial(s); "
                 f"study has {result.progress['done']}/{target} finished")
    return result


def stop_at_target(target: int):
    """An ``optimize`` callback: stop this process once the shared study has ``target`` finished trials."""

    def callback(study, trial) -> None:
        if study_progress(study)["done"] >= target:
            study.stop()

    return callback
