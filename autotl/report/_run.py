"""The run folder as the report reads it: each artefact parsed once, what could not be read noted."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._csv import read_row
from ..errors import AutotlError

#: Files whose presence makes a folder a run folder the report can describe.
ARTEFACTS = ("model.json", "result.json", "data.json", "scoring.json", "leaderboard.json", "study.db", "dropped.csv",
             "retrieval.csv", "history.json")


@dataclass
class RunFolder:
    """Everything read from a run folder (each item None when absent or unreadable)."""

    dir: Path
    card: dict | None = None
    result: dict | None = None
    data: dict | None = None
    history: list | None = None
    scoring: dict | None = None
    leaderboard: list | None = None
    problems: list[str] = field(default_factory=list)  # "file: why it could not be read"

    def _pick(self, key: str) -> Any:
        for doc in (self.card, self.result):
            if isinstance(doc, dict) and doc.get(key):
                return doc[key]
        return None

    @property
    def training(self) -> dict:
        # "strategy" is what cards of autotl 0.1 called it
        return self._pick("training") or self._pick("strategy") or {}

    @property
    def metrics(self) -> dict:
        res = (self.result or {}).get("metrics")  # result.json keeps the confusion matrices
        return res if isinstance(res, dict) and res else ((self.card or {}).get("metrics") or {})

    @property
    def parity(self) -> dict:
        return self._pick("parity") or {}

    @property
    def search(self) -> dict | None:
        extra = (self.card or {}).get("extra") or {}
        return extra.get("search") or (self.result or {}).get("search") or None

    @property
    def estimate(self) -> dict | None:
        """The card's headline estimate of accuracy on new images (``autotl.estimate``), if any."""
        for doc in (self.card, self.result):
            est = (doc or {}).get("estimate") if isinstance(doc, dict) else None
            if isinstance(est, dict) and est.get("accuracy") is not None:
                return est
        return None

    @property
    def refit_on_val(self) -> bool:
        """The final model trained on val (a search's refit on all labelled images)."""
        search = self.search or {}
        return bool(search.get("refit_on_val")) or "val" in str(search.get("refit_on") or "")

    def role(self, split: str) -> str | None:
        """What a split's figures are, as the card says ("held out: ...", "trained on: ..."); for
        cards without roles, what the run implies (None: not known)."""
        for doc in (self.result, self.card):
            m = ((doc or {}).get("metrics") or {}).get(split) if isinstance(doc, dict) else None
            if isinstance(m, dict) and m.get("role"):
                return str(m["role"])
        if split == "test":
            return "held out: the test/ split decided nothing"
        if split == "val" and self.refit_on_val:
            return "trained on: the refit after the search trained on val (not an estimate of new images)"
        return None

    def trained_on(self, split: str) -> bool:
        return str(self.role(split) or "").startswith("trained on")

    @property
    def trial_score(self) -> str:
        """What a trial's score is, in words: cross-validated (cv, val-cv), held out (holdout) or,
        for searches of autotl 0.1, the val score."""
        kind = ((self.search or {}).get("selection") or {}).get("kind")
        return {"cv": "cross-validated", "val-cv": "cross-validated", "holdout": "held-out"}.get(kind, "val")

    @property
    def phases(self) -> dict[str, float]:
        """Seconds per phase of the fit (``extra.phases`` of the card, else result.json's), numbers only."""
        extra = (self.card or {}).get("extra") or {}
        for doc in (extra.get("phases"), (self.result or {}).get("phases")):
            if isinstance(doc, dict) and doc:
                return {str(k): float(v) for k, v in doc.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0}
        return {}

    @property
    def wall_seconds(self) -> float | None:
        extra = (self.card or {}).get("extra") or {}
        for v in (extra.get("wall_seconds"), (self.result or {}).get("seconds")):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return None

    @property
    def dataset(self) -> dict:
        if isinstance(self.data, dict):
            return self.data
        return (self.result or {}).get("data") or (self.card or {}).get("data") or {}

    @property
    def classes(self) -> list[str]:
        for doc in (self.card, self.result, self.dataset):
            if isinstance(doc, dict) and doc.get("classes"):
                return [str(c) for c in doc["classes"]]
        return [str(c) for c in ((self.scoring or {}).get("data") or {}).get("classes") or []]

    @property
    def model_name(self) -> str | None:
        sm = (self.card or {}).get("source_model") or {}
        return sm.get("name") or (self.result or {}).get("source_model")

    @property
    def weights_origin(self) -> str | None:
        sm = (self.card or {}).get("source_model") or {}
        return sm.get("weights_origin") or (self.result or {}).get("weights_origin")

    @property
    def data_root(self) -> str | None:
        root = self.dataset.get("root")
        return str(root) if root else None


def _read_json(run: RunFolder, name: str, kind: type) -> Any:
    path = run.dir / name
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        run.problems.append(f"{name}: cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if not isinstance(doc, kind):
        run.problems.append(f"{name}: expected a JSON {kind.__name__}, found {type(doc).__name__}")
        return None
    return doc


def read_csv(run: RunFolder, name: str) -> list[dict[str, str]] | None:
    """Rows of ``RUN_DIR/name`` (None when absent, or unreadable: then noted in ``run.problems``)."""
    path = run.dir / name
    if not path.is_file():
        return None
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [read_row(row) for row in csv.DictReader(fh)]  # undo the '=... guard of the writers
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        run.problems.append(f"{name}: cannot be read ({type(exc).__name__}: {str(exc)[:120]})")
        return None


def load_run(run_dir: str | os.PathLike) -> RunFolder:
    """Read a run folder; raises ``AutotlError`` when it is not one."""
    path = Path(run_dir).expanduser()
    fix = "give the folder written by `autotl fit` (its --out), e.g. `autotl report runs/mydata-20250101-120000`"
    if not path.exists():
        raise AutotlError(f"{path}: no such run folder; {fix}")
    if not path.is_dir():
        raise AutotlError(f"{path}: is a file, not a run folder; {fix}")
    run = RunFolder(path)
    run.card = _read_json(run, "model.json", dict)
    run.result = _read_json(run, "result.json", dict)
    run.data = _read_json(run, "data.json", dict)
    run.history = _read_json(run, "history.json", list)
    run.scoring = _read_json(run, "scoring.json", dict)
    run.leaderboard = _read_json(run, "leaderboard.json", list)
    present = [a for a in ARTEFACTS if (path / a).is_file()] + (["datl/"] if any(path.glob("datl/*.npz")) else [])
    if not present:
        raise AutotlError(f"{path}: not an autotl run folder (none of model.json, result.json, scoring.json, study.db, "
                          f"dropped.csv, retrieval.csv in it); {fix}")
    usable = any(x is not None for x in (run.card, run.result, run.data, run.history, run.scoring, run.leaderboard)) or \
        any(a in present for a in ("study.db", "dropped.csv", "retrieval.csv", "datl/"))
    if not usable:  # then every artefact here is a JSON file that failed to parse, each noted in problems
        raise AutotlError(f"{path / run.problems[0]}; re-run `autotl fit` into this folder to rewrite it")
    return run
