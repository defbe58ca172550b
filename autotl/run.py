"""The run object: what every step of ``autotl fit`` (and a search worker) shares.

``Run.open`` scans the data, picks the device, creates the run folder, loads each candidate source
model once and puts one ``SharedActivations`` (frozen-activation cache) in front of each. Scoring,
the search, the refit and publishing all take the run; nothing below it imports ``autotl.fit``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import _console
from ._io import atomic_write_json
from ._memory import trim_heap
from ._version import __version__
from .activations import SharedActivations
from .data import DatasetIndex, scan_dataset
from .errors import AutotlError
from .features import FeatureExtractor
from .models import DEFAULT_MODEL, ModelSpec, SourceModel, create_source_model, list_packaged_models, set_torch_threads
from .options import check_out_dir
from .train import pick_device


def default_cache_dir() -> Path:
    """``$AUTOTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/autotl/features`` (``~/.cache/autotl/features``)."""
    env = os.environ.get("AUTOTL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autotl" / "features"


def default_candidates() -> list[str]:
    """The candidate source models when none is named: every packaged ImageNet model installed."""
    return list_packaged_models() or [DEFAULT_MODEL]


def default_run_dir(data_dir: str | os.PathLike, kind: str = "") -> Path:
    """``runs/<data>[-<kind>]-<time>``: where a command writes when no ``--out`` is given."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "-".join(p for p in (Path(data_dir).resolve().name, kind, stamp) if p)


RUN_MARKER = "autotl-run.json"  # written into every run folder: what makes a folder autotl's to replace
_PUBLISHED = ("model.json", "model.onnx")  # a folder holding these holds a finished run


def is_run_folder(path: Path) -> bool:
    """autotl made this folder (its marker, or the files of a run from autotl 0.1)."""
    return (path / RUN_MARKER).is_file() or any((path / f).exists() for f in (*_PUBLISHED, "study.db", "result.json"))


def check_run_folder(out: Path, data_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a ``--out`` autotl must not write to, before any work starts: what ``check_out_dir``
    refuses (a file, an unwritable place); the data folder,
    a folder inside it or one holding it (the next scan would see the run's files as a class); a
    folder of other files; a finished run, unless ``--resume`` continues it or ``--overwrite``
    replaces it. A run interrupted before it published (no model yet) is simply continued."""
    out_r, data_r = out.resolve(), data_dir.resolve()
    if out_r == data_r or data_r in out_r.parents or out_r in data_r.parents:
        raise AutotlError(f"--out {out}: is the data folder {data_dir} or overlaps it; give a run folder outside the data "
                          "(e.g. runs/NAME)")
    check_out_dir("--out", out)  # not a file, writable or creatable (the same check every --out gets)
    if out.is_dir() and any(out.iterdir()):
        if not is_run_folder(out):
            raise AutotlError(f"--out {out}: holds files that are not an autotl run; give a new or empty folder "
                              "(autotl replaces only its own runs)")
        if any((out / f).exists() for f in _PUBLISHED) and not (resume or overwrite):
            raise AutotlError(f"--out {out}: holds an earlier run (model.json); add --overwrite to replace it, "
                              "--resume to continue its search, or give another --out")


def prepare_run_folder(out: Path, data_dir: Path, *, overwrite: bool) -> None:
    """Create the run folder (after ``check_run_folder``). ``--overwrite`` first moves a finished run
    aside (``Run.drop_replaced`` deletes it once the new run is published), so an interrupted
    overwrite loses nothing and no file of the old run is mixed into the new one."""
    if overwrite and any((out / f).exists() for f in _PUBLISHED):
        moved = out.with_name(f"{out.name}.replaced-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}")
        os.replace(out, moved)
        _console.log(f"the earlier run in {out} is kept in {moved} until this one is published")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutotlError(f"--out {out}: cannot create it ({exc.strerror or exc}); give a folder you can write to") from None
    if not (out / RUN_MARKER).is_file():
        atomic_write_json(out / RUN_MARKER, {"autotl": __version__, "data_dir": str(data_dir.resolve()),
                                             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})


class Phases:
    """Seconds spent in each named phase of a run (scan, scoring, search, ...), in the order they
    first ended (a nested phase before the one around it). Exclusive: the time of a phase nested in another counts for the inner one only,
    so the phases never sum to more than the wall time. A phase entered twice accumulates."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._stack: list[list] = []  # [name, started, seconds spent in nested phases]

    @contextlib.contextmanager
    def __call__(self, name: str):
        frame = [name, time.monotonic(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            trim_heap()  # what this phase freed does not stay resident under the next one
            took = time.monotonic() - frame[1]
            self.seconds[name] = self.seconds.get(name, 0.0) + took - frame[2]
            if self._stack:
                self._stack[-1][2] += took

    def to_json(self) -> dict[str, float]:
        return {name: round(s, 2) for name, s in self.seconds.items()}

    def line(self) -> str:
        """``scan 1s, scoring 35s, ...`` for the console."""
        return ", ".join(f"{name} {s:.0f}s" for name, s in self.seconds.items())


@dataclass
class FinalModel:
    """The model a run publishes: trained by the one strategy the flags describe, or refitted from
    the search's winner; with what the card says about how it was chosen."""

    result: Any  # autotl.train.TrainResult
    source: SourceModel
    extractor: SharedActivations
    decided_by: dict[str, str]
    notes: dict[str, Any] = field(default_factory=dict)  # search params, the strategy in words, what each strategy did
    search: dict[str, Any] | None = None
    # an ensemble chosen after the search (autotl.ensemble.EnsembleMember, primary = ``result`` first);
    # empty: the single model ``result`` is published
    members: list[Any] = field(default_factory=list)


@dataclass
class Run:
    """One ``fit``: data index, run folder, device, caches and the loaded candidate models."""

    index: DatasetIndex
    run_dir: Path
    device: torch.device
    cache_dir: Path
    sources: dict[str, SourceModel]  # label -> model, in the order given (ranked after scoring)
    extractors: dict[str, SharedActivations]  # label -> the one activation cache of that model
    seed: int = 0
    val_fraction: float = 0.1  # of the automatic val split (recorded for workers rebuilding the same split)
    duplicates: str = "warn"  # what the scan did with byte-identical copies (workers scan the same way)
    start: float = field(default_factory=time.monotonic)
    phases: Phases = field(default_factory=Phases)

    def drop_replaced(self) -> None:
        """After publishing: delete the runs --overwrite moved aside (also those of an overwrite
        that was interrupted before, which this run completes)."""
        for old in self.run_dir.parent.glob(f"{self.run_dir.name}.replaced-*"):
            if old.is_dir() and is_run_folder(old):
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def open(cls, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
             models: Sequence[str | ModelSpec] = (), val_fraction: float = 0.1, seed: int = 0,
             device: str | torch.device | None = "auto", cache_dir: str | os.PathLike | None = None,
             index: DatasetIndex | None = None, resume: bool = False, overwrite: bool = False,
             duplicates: str = "warn") -> "Run":
        start = time.monotonic()
        phases = Phases()
        set_torch_threads()
        data_dir = Path(data_dir)
        run_dir = Path(out) if out is not None else default_run_dir(data_dir)
        check_run_folder(run_dir, data_dir, resume=resume, overwrite=overwrite)
        if index is None:
            with phases("scan"):
                index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed, duplicates=duplicates)
            _console.log(index.summary_table())
        prepare_run_folder(run_dir, data_dir, overwrite=overwrite)
        dev = device if isinstance(device, torch.device) else pick_device(device)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        with phases("model loading"):
            loaded = [create_source_model(m) for m in (list(models) or default_candidates())]
        sources = {s.label: s for s in loaded}
        if len(sources) != len(loaded):
            raise AutotlError("--model: the same model is given twice; give each candidate once")
        extractors = {label: SharedActivations(FeatureExtractor(s, device=dev, cache_dir=cache), index.train, index.val,
                                               index.test) for label, s in sources.items()}
        return cls(index, run_dir, dev, cache, sources, extractors, seed, float(val_fraction), duplicates, start, phases)

    @property
    def labels(self) -> list[str]:
        return list(self.sources)

    def keep(self, labels: Sequence[str]) -> None:
        """Keep only these candidates, in this order (the ranking's top ones)."""
        missing = [label for label in labels if label not in self.sources]
        if missing:
            raise KeyError(f"not a candidate of this run: {missing}")
        self.sources = {label: self.sources[label] for label in labels}
        self.extractors = {label: self.extractors[label] for label in labels}

    def forward_batches(self) -> int:
        """Batches pushed through any candidate's backbone so far (trials record their own share)."""
        return sum(e.forward_batches for e in self.extractors.values())

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def phase(self, name: str):
        """``with run.phase("scoring"): ...``: that time is the phase's on the card and in the report."""
        return self.phases(name)
