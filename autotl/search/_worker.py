"""``autotl worker``: join a study in a shared storage and run its trials (see ``_distributed``).

Kept apart from ``_distributed`` (storage, heartbeat, study attributes), which ``_study`` and
``_fit`` import: the worker needs both of those, so living beside them would close an import cycle.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _console
from ..errors import AutotlError
from ..options import SearchOptions
from ._distributed import WORKER_ATTR, _surplus, fail_stale, heartbeat_kwargs, recipe_from_json, study_progress

@dataclass
class WorkerResult:
    study_name: str
    storage: str
    worker_id: str
    trials: list[int] = field(default_factory=list)  # trial numbers this worker ran
    stopped_by: str = "target"  # "target" | "own_trials" | "converged" (``_schedule``)
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
    from ._schedule import schedule_for
    from ._study import make_sampler, open_study, quiet_optuna

    start = time.monotonic()
    if trials is not None and trials < 1:
        raise AutotlError(f"--trials {trials}: give at least 1")
    url = str(storage)
    probe, attrs = load_worker_study(url, study_name)
    w = attrs[WORKER_ATTR]
    data = Path(data_dir) if data_dir is not None else Path(w["data_dir"])
    if not (data.is_dir() or (data.is_file() and w.get("columns"))):
        raise AutotlError(f"--data {data}: not on this host; give the study's data folder or label file "
                          f"(created from {w['data_dir']}) with --data")
    columns = w.get("columns") or {}
    index = scan_dataset(data, val_fraction=w["val_fraction"], seed=w["seed"], duplicates=w.get("duplicates", "warn"),
                         path_column=columns.get("path"), label_column=columns.get("label"))
    if index.fingerprint() != attrs.get("data_fingerprint"):
        raise AutotlError(f"--data {data}: differs from the data study {study_name!r} was created with "
                          "(files added, removed, edited or re-split); give the same data folder")
    recipe = recipe_from_json(attrs["recipe"])
    base = TrainConfig(**w["base"])
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    run_dir = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"autotl-worker-{study_name}-"))
    run = Run.open(data, run_dir, models=w["models"], val_fraction=w["val_fraction"], seed=w["seed"], device=device,
                   cache_dir=cache_dir, index=index)
    plan = plan_search(run, base, SearchOptions(trials=w["target"], recipe=recipe, resume=True, storage=url, study=study_name,
                                                fixed_params=w["fixed"], options=w["options"], cv_folds=w["cv_folds"],
                                                cv_repeats=w["cv_repeats"]))
    study, _ = open_study(plan.settings, url, fingerprint=plan.fingerprint)
    # every worker proposes from its own seed (the same seed in two workers would replay the same trials)
    study.sampler = make_sampler(recipe, w["seed"] + os.getpid() * 7919 + time.time_ns() % 100_003,
                                 len(study.get_trials(deepcopy=False)), shared=True)
    schedule = schedule_for(study, plan.recipe, plan.objective.fixed, log=_console.log)  # over every worker's trials
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
        if schedule is not None and schedule.apply(study).stop:  # the stage follows every worker's trials
            result.stopped_by = "converged"
            break
        n_before = len(objective.started)
        with quiet_optuna():
            study.optimize(guarded, n_trials=1, catch=(TrialFailed,), callbacks=[log_cb])
        result.trials += objective.started[n_before:]
    result.progress = study_progress(study)
    result.seconds = time.monotonic() - start
    _console.log(f"worker {worker_id} done ({result.stopped_by}): ran {len(result.trials)} trial(s); "
                 f"study has {result.progress['done']}/{target} finished")
    return result


