"""The search's trials for the report: the Optuna study opened read-only from the storage the card
records (else ``RUN_DIR/study.db``), with ``leaderboard.json`` as the fallback; and its plots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..search._distributed import interrupted_numbers, is_interrupted
from ..search._study import quiet_optuna

STUDY_FILE = "study.db"
_JOURNAL_SUFFIXES = (".log", ".journal", ".jsonl")
_STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}

#: (key, title, optuna.visualization function) — the plots the report embeds, in order.
PLOTS = (
    ("history", "Optimisation history", "plot_optimization_history"),
    ("param_importances", "Parameter importance (fANOVA)", "plot_param_importances"),
    ("parallel_coordinate", "Parallel coordinates", "plot_parallel_coordinate"),
    ("intermediate_values", "Intermediate scores (what the pruner saw)", "plot_intermediate_values"),
)


@dataclass
class Trials:
    rows: list[dict[str, Any]]  # number, state, value (value_std, n_folds), params, seconds, description, baseline, error; best first
    source: str  # where they came from, in words
    study: Any = None  # optuna.Study when the storage could be opened
    notes: list[str] = field(default_factory=list)



def _readonly_storage(url: str, run_dir: Path):
    """An Optuna storage that never writes: SQLite opened with ``mode=ro``, journal files read as
    they are, other RDB URLs without table creation. Raises FileNotFoundError / anything optuna raises."""
    import optuna

    if url.startswith("journal:") or ("://" not in url and url.endswith(_JOURNAL_SUFFIXES)):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.is_absolute() and (run_dir / path).is_file():
            path = run_dir / path
        if not path.is_file():  # the backend would create it
            raise FileNotFoundError(f"journal file {path} does not exist")
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite:///"):
        raw = url[len("sqlite:///"):].split("?", 1)[0]
        if raw.startswith("file:"):
            raw = raw[len("file:"):]
        path = Path(raw)
        if not path.is_absolute() and not path.is_file() and (run_dir / path).is_file():
            path = run_dir / path
        if not path.is_file():  # sqlite would create an empty database
            raise FileNotFoundError(f"study database {path} does not exist")
        ro = f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"
        return optuna.storages.RDBStorage(ro, skip_table_creation=True, skip_compatibility_check=True)
    kwargs = {}
    if url.startswith(("postgresql", "mysql")):
        kwargs = {"connect_args": {"connect_timeout": 5}}
    return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True, skip_compatibility_check=True)


def open_study(url: str, study_name: str | None, run_dir: Path):
    """(study, name) opened read-only; raises with a short reason when it cannot be."""
    import optuna

    with quiet_optuna(all_warnings=True):
        storage = _readonly_storage(url, run_dir)
        if study_name is None:
            names = optuna.get_all_study_names(storage)
            if "autotl" in names or not names:
                study_name = "autotl"
            elif len(names) == 1:
                study_name = names[0]
            else:
                raise LookupError(f"{len(names)} studies in the storage ({', '.join(names[:5])}) and the card names none")
        return optuna.load_study(study_name=study_name, storage=storage), study_name


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def load_trials(run_dir: Path, search: dict[str, Any] | None, leaderboard: list[dict] | None) -> Trials | None:
    """The search's trials, or None when this run has no search."""
    search = search or {}
    url = search.get("storage")
    if not url and (run_dir / STUDY_FILE).is_file():
        url = f"sqlite:///{(run_dir / STUDY_FILE).resolve()}"
    by_number = {r.get("number"): r for r in (leaderboard or []) if isinstance(r, dict)}
    notes: list[str] = []
    study = None
    if url:
        try:
            study, name = open_study(str(url), search.get("study_name"), run_dir)
        except ImportError:
            notes.append("optuna is not installed: trials come from leaderboard.json")
        except Exception as exc:  # noqa: BLE001 - unreachable server, missing file, wrong name
            notes.append(f"could not open the study in {url} ({_first_line(exc)})"
                         + ("; trials come from leaderboard.json" if by_number else ""))
    if study is not None:
        rows = []
        cut = interrupted_numbers(study)
        for t in study.get_trials(deepcopy=False):
            lb = by_number.get(t.number, {})
            ua = t.user_attrs
            value = t.value
            if value is None and t.state.name == "PRUNED" and t.intermediate_values:
                value = t.intermediate_values[max(t.intermediate_values)]
            dur = t.duration.total_seconds() if t.duration is not None else ua.get("seconds")
            rows.append({
                "number": t.number, "state": t.state.name, "value": value,
                "params": lb.get("params") or dict(t.params), "raw_params": dict(t.params),
                "seconds": dur, "epochs_run": lb.get("epochs_run") or (len(t.intermediate_values) or None),
                "description": lb.get("description"), "value_std": lb.get("value_std"), "n_folds": lb.get("n_folds"),
                "baseline": bool(ua.get("baseline")),
                "interrupted": is_interrupted(t, cut), "error": ua.get("error"),
                "intermediate": dict(t.intermediate_values),
            })
        source = f"study '{name}' in {url} (opened read-only)"
    elif by_number:
        rows = [{**r, "raw_params": r.get("params") or {}, "intermediate": {}} for r in by_number.values()]
        source = "leaderboard.json"
    else:
        return Trials([], "", None, notes) if notes else None
    rows.sort(key=lambda r: (_STATE_ORDER.get(r["state"], 5), -(r["value"] if _finite(r["value"]) else -1e18), r["number"]))
    return Trials(rows, source, study, notes)


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def plotly_available() -> bool:
    try:
        import plotly  # noqa: F401
        import plotly.offline  # noqa: F401
    except ImportError:
        return False
    return True


def plotly_figures(study) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(key, title, html div)], notes) of Optuna's plotly plots; plotly.js is NOT included."""
    import optuna.visualization as vis
    from optuna.trial import TrialState

    out, notes = [], []
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return out, ["no completed trial yet: no plots"]
    for key, title, fn in PLOTS:
        try:
            with quiet_optuna(all_warnings=True):
                fig = getattr(vis, fn)(study)
            fig.update_layout(title_text="", height=360, margin={"l": 60, "r": 30, "t": 30, "b": 50})
            div = fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot-{key}",
                              config={"displaylogo": False, "responsive": True}, default_height="360px")
            out.append((key, title, div))
        except Exception as exc:  # noqa: BLE001 - e.g. importance needs two completed trials
            notes.append(f"{title}: not available ({_first_line(exc)})")
    return out, notes


def param_importances(study) -> dict[str, float] | None:
    """fANOVA importances (None when Optuna cannot compute them, e.g. < 2 completed trials)."""
    try:
        import optuna

        with quiet_optuna(all_warnings=True):
            return dict(optuna.importance.get_param_importances(study))
    except Exception:  # noqa: BLE001
        return None


def plotly_js() -> str:
    import plotly.offline

    return plotly.offline.get_plotlyjs()
