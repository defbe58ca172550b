"""The Optuna study: storage, resume checks, sampler, pruner, the optimisation loop, Ctrl-C."""

from __future__ import annotations

import contextlib
import datetime as _dt
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import _console
from .._version import __version__
from ..errors import AutotlError
from ._objective import Objective, TrialFailed
from ._schedule import schedule_for
from .._recipe import Recipe

STUDY_FILE = "study.db"
DEFAULT_STUDY = "autotl"
_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the running trial was marked FAIL; the study can be resumed."""

    def __init__(self, message: str, *, run_dir: Path, study_name: str, storage: str, finished: int):
        super().__init__(message)
        self.message = message
        self.run_dir = Path(run_dir)
        self.study_name = study_name
        self.storage = storage
        self.finished = finished

    def __str__(self) -> str:
        return self.message


@dataclass
class SearchSettings:
    """How many trials, how long, where the study lives."""

    recipe: Recipe
    trials: int
    time_budget: float | None = None  # seconds; whichever of trials / budget ends first
    storage: str | None = None  # Optuna storage URL; default sqlite:///RUN_DIR/study.db
    study_name: str = DEFAULT_STUDY
    resume: bool = False
    seed: int = 0
    user_attrs: dict[str, Any] = field(default_factory=dict)  # written once, when the study is created


@dataclass
class SearchOutcome:
    study: Any  # optuna.Study
    storage: str
    study_name: str
    created: bool
    seconds: float
    stopped_by: str  # "trials" | "time_budget" | "converged" (``_schedule``) | "already_done"
    session_trials: list[int] = field(default_factory=list)
    schedule: list[dict[str, Any]] = field(default_factory=list)  # the family schedule's changes (``_schedule``)


# --------------------------------------------------------------------------------------- storage
def storage_url(run_dir: Path, storage: str | None) -> str:
    """The study's storage URL: ``--storage`` as given, else SQLite in the run folder."""
    if storage:
        return str(storage)
    return f"sqlite:///{(Path(run_dir) / STUDY_FILE).resolve()}"


def shown_url(url: str) -> str:
    """``url`` with any password masked: what the card, the report and logs may show (they are
    world-readable files, unlike the storage itself)."""
    import re

    return re.sub(r"(://[^/:@]+):[^@/]*@", r"\1:***@", str(url))


def is_own_storage(run_dir: Path, url: str) -> bool:
    return url == storage_url(run_dir, None)


def make_storage(url: str):
    """An Optuna storage for ``url``: any RDB URL (sqlite/postgresql/mysql), or a journal file
    (``journal:PATH`` or a path ending in .log/.journal/.jsonl)."""
    import optuna

    if url.startswith("journal:") or ("://" not in url and url.endswith(_JOURNAL_SUFFIXES)):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise AutotlError(f"--storage {shown_url(url)}: give an Optuna storage URL (sqlite:///path.db, postgresql://...) "
                          "or a journal file (journal:path or path.log)")
    if url.startswith("sqlite"):
        kwargs: dict = {"connect_args": {"timeout": 60}}
    else:  # a server's connections close after each operation: storages opened by checks, workers and
        # heartbeats never pile up against its max_connections
        from sqlalchemy.pool import NullPool

        kwargs = {"poolclass": NullPool}
    try:
        from ._distributed import heartbeat_kwargs, rdb_url, uses_heartbeat

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(rdb_url(url), engine_kwargs=kwargs,
                                              **(heartbeat_kwargs() if uses_heartbeat(url) else {}))
    except AutotlError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad URL, missing driver, unreachable server
        raise AutotlError(f"--storage {shown_url(url)}: cannot open ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from exc


@contextlib.contextmanager
def quiet_optuna(*, all_warnings: bool = False) -> Iterator[None]:
    """Optuna's own per-trial log lines duplicate ours; keep only its errors. Its experimental-feature
    warnings are silenced too (all warnings with ``all_warnings``: the report reading a study)."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Warning if all_warnings else optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def make_sampler(recipe: Recipe, seed: int, n_existing: int, *, shared: bool):
    """Seeded multivariate TPE; reseeded by the number of existing trials so a resumed study does
    not replay the proposals of its first session.

    ``shared``: other processes may run trials of the study at the same time (``--storage``, ``autotl
    worker``). Only then does TPE's constant liar count their running trials as bad, so that two
    workers do not propose the same point. In a study of one process the only running trial is the
    one being sampled, which the liar skips: it would propose the same, at the cost of a storage
    read per parameter group and a write per trial."""
    import optuna

    cfg = recipe.sampler
    multivariate = bool(cfg.get("multivariate", True))
    return optuna.samplers.TPESampler(
        seed=int(cfg.get("seed", seed)) + n_existing,
        n_startup_trials=int(cfg.get("n_startup_trials", 8)),
        multivariate=multivariate,
        group=multivariate and bool(cfg.get("group", True)),  # conditional spaces
        constant_liar=shared,
    )


def make_pruner(recipe: Recipe):
    import optuna

    cfg = dict(recipe.pruner)
    kind = cfg.pop("type", "median")
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "paired":
        from ._pruning import PairedFoldPruner

        return PairedFoldPruner(margin_se=float(cfg.get("margin_se", 1.0)), min_folds=int(cfg.get("min_folds", 1)))
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=int(cfg.get("min_resource", 1)),
                                              max_resource=cfg.get("max_resource", "auto"),
                                              reduction_factor=int(cfg.get("reduction_factor", 3)))
    return optuna.pruners.MedianPruner(n_startup_trials=int(cfg.get("n_startup_trials", 4)),
                                       n_warmup_steps=int(cfg.get("n_warmup_steps", 1)),
                                       interval_steps=int(cfg.get("interval_steps", 1)))


# --------------------------------------------------------------------------------------- trials
def finished_trials(study) -> list:
    """Trials that count towards ``--trials``: complete, pruned or failed — not those cut off by Ctrl-C,
    nor those the time budget kept from starting (they measured nothing)."""
    from optuna.trial import TrialState

    from ._distributed import counts_towards_trials, interrupted_numbers

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    cut = interrupted_numbers(study)
    return [t for t in study.get_trials(deepcopy=False) if t.state in done and counts_towards_trials(t, cut)]


def fail_running(study, numbers: set[int] | None = None) -> list[int]:
    """Mark RUNNING trials (all, or those in ``numbers``) FAIL and interrupted: left by Ctrl-C or a kill.
    Public Optuna API only: ``study.tell(..., state=FAIL, skip_if_finished=True)``, and the numbers
    go to the study's ``interrupted_trials`` attribute."""
    from optuna.trial import TrialState

    from ._distributed import mark_interrupted

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if numbers is None or t.number in numbers:
            with contextlib.suppress(Exception):
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                out.append(t.number)
    with contextlib.suppress(Exception):
        mark_interrupted(study, out)
    return out


# --------------------------------------------------------------------------------------- study
def open_study(settings: SearchSettings, url: str, *, fingerprint: dict[str, Any], shared: bool = True) -> tuple[Any, bool]:
    """Create the study, or load it for ``--resume`` after checking it matches this run.

    ``fingerprint``: study user attributes that must be equal on resume (data fingerprint, recipe
    space, objective, candidates). ``shared``: other processes may run its trials (``make_sampler``).
    """
    import optuna

    storage = make_storage(url)
    with quiet_optuna():
        names = optuna.get_all_study_names(storage)
        exists = settings.study_name in names
        if exists and not settings.resume:
            raise AutotlError(f"study {settings.study_name!r} already exists in {shown_url(url)}; add --resume to continue it, "
                              "or give another --out / --study")
        if not exists and settings.resume:
            raise AutotlError(f"--resume: no study {settings.study_name!r} in {shown_url(url)}; run without --resume to start one "
                              f"(studies there: {', '.join(names) or 'none'})")
        n_existing = 0
        if exists:
            probe = optuna.load_study(study_name=settings.study_name, storage=storage)
            _check_resume(probe, fingerprint, url)
            n_existing = len(probe.get_trials(deepcopy=False))
        study = optuna.create_study(
            storage=storage, study_name=settings.study_name, direction="maximize", load_if_exists=True,
            sampler=make_sampler(settings.recipe, settings.seed, n_existing, shared=shared),
            pruner=make_pruner(settings.recipe),
        )
        if not exists:
            for k, v in fingerprint.items():
                study.set_user_attr(k, v)
            study.set_user_attr("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
            study.set_user_attr("autotl_version", __version__)
            study.set_user_attr("recipe", settings.recipe.to_json())
            for k, v in settings.user_attrs.items():
                study.set_user_attr(k, v)
            for params in settings.recipe.baselines:
                study.enqueue_trial(dict(params), user_attrs={"baseline": True})
    return study, not exists


def stored_study_attr(url: str, study_name: str, key: str) -> Any:
    """User attribute ``key`` of an existing study (None when the study or the attribute is absent)."""
    import optuna

    with quiet_optuna():
        storage = make_storage(url)
        if study_name not in optuna.get_all_study_names(storage):
            return None
        return optuna.load_study(study_name=study_name, storage=storage).user_attrs.get(key)


_RESUME_WHAT = {
    "data_fingerprint": "the data changed since this study started (files added, removed, edited or re-split); "
                        "start a new run (another --out) instead",
    "recipe_space": "the recipe's search space differs from the one this study was started with; resume with the same "
                    "--recipe, or start a new run",
    "objective": "the objective differs from this study's; resume with the same --objective",
    "candidates": "the candidate models differ from this study's; resume with the same --model list and --top-k",
}


def _check_resume(study, fingerprint: dict[str, Any], url: str) -> None:
    attrs = study.user_attrs
    for key, want in fingerprint.items():
        have = attrs.get(key)
        if have is not None and have != want:
            why = _RESUME_WHAT.get(key, f"{key} differs")
            raise AutotlError(f"--resume: study {study.study_name!r} in {shown_url(url)}: {why}")


# trials kept from starting by the budget do not count towards --trials; this bounds them (with the
# budget, which stops the study when nothing the recipe allows fits)
MAX_TRIALS_PER_COUNTED = 10


def _stop_after(n: int):
    """An ``optimize`` callback: stop once ``n`` trials of this process count towards ``--trials``."""
    from ._distributed import counts_towards_trials

    counted = 0

    def callback(study, trial) -> None:
        nonlocal counted
        counted += counts_towards_trials(trial)
        if counted >= n:
            study.stop()

    return callback


def run_study(objective: Objective, settings: SearchSettings, url: str, *, fingerprint: dict[str, Any],
              on_trial=None) -> SearchOutcome:
    """Create or resume the study and run trials until ``settings.trials`` have finished or the
    time budget is spent. Ctrl-C marks the running trial FAIL and raises ``SearchInterrupted``."""

    own = is_own_storage(objective.run_dir, url)  # else other processes may share the study
    study, created = open_study(settings, url, fingerprint=fingerprint, shared=not own)
    if not created:
        stale = fail_running(study, None if own else set())
        if stale:
            _console.log(f"marked trial(s) {', '.join(map(str, stale))} failed: they were cut off when the study was interrupted")
    done = len(finished_trials(study))
    remaining = settings.trials - done
    start = time.monotonic()
    if remaining <= 0:
        _console.log(f"study {settings.study_name!r} already has {done} finished trials (--trials {settings.trials}); "
                     "nothing left to search — raise --trials to search more")
        return SearchOutcome(study, url, settings.study_name, created, 0.0, "already_done")
    budget = settings.time_budget
    objective.deadline = start + budget if budget else None
    objective.budget = budget
    what = f"{remaining} trial(s)" + (f" (of {settings.trials}; {done} done)" if done else "")
    _console.log(f"searching {what} with recipe [bold]{settings.recipe.name}[/]"
                 + (f", time budget {budget:.0f}s" if budget else "") + f" — study {settings.study_name!r} in {shown_url(url)}")
    callbacks = [on_trial] if on_trial is not None else []
    callbacks.append(_stop_after(remaining))
    schedule = schedule_for(study, objective.recipe, objective.fixed, log=_console.log)
    if schedule is not None:
        callbacks.append(schedule)
    if not own:  # workers may share the study: stop at its target
        from ._distributed import stop_at_target

        callbacks.append(stop_at_target(settings.trials))
    first = len(objective.started)
    try:
        with quiet_optuna():
            study.optimize(objective, n_trials=remaining * MAX_TRIALS_PER_COUNTED, timeout=budget, catch=(TrialFailed,),
                           callbacks=callbacks)
    except KeyboardInterrupt:
        with contextlib.suppress(BaseException):
            mine = set(objective.started[first:])
            fail_running(study, None if own else mine)
        finished = len(finished_trials(study))
        raise SearchInterrupted(
            f"search interrupted: {finished} of {settings.trials} trials finished, the running one was marked failed; "
            f"study {settings.study_name!r} is kept in {shown_url(url)}",
            run_dir=objective.run_dir, study_name=settings.study_name, storage=url, finished=finished,
        ) from None
    seconds = time.monotonic() - start
    n_done = len(finished_trials(study))
    stopped = "trials" if n_done >= settings.trials else "converged" if schedule is not None and schedule.stopped else "time_budget"
    return SearchOutcome(study, url, settings.study_name, created, seconds, stopped, list(objective.started[first:]),
                         schedule.changes if schedule is not None else [])
