"""The run object: what every step of ``autotl fit`` (and a search worker) shares.

``Run.open`` scans the data, resolves the device policy (``autotl.device``), creates the run folder,
loads each candidate source model once and puts one ``SharedActivations`` (frozen-activation cache)
in front of each. Scoring,
the search, the refit and publishing all take the run; nothing below it imports ``autotl.fit``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from . import _console
from ._io import atomic_write_json
from ._memory import BoundedMemory, peak_rss_mb, trim_heap
from ._runfolder import (DISCARDED, LOCK_NAME, RUN_MARKER, SET_ASIDE, autotl_entries, foreign_entries, hold_run_folder,
                         is_finished, is_run_folder)
from ._version import __version__
from .activations import SharedActivations
from .data import DatasetIndex, scan_dataset
from .device import DevicePolicy, as_policy, configure_torch
from .errors import AutotlError
from .features import DecodedImages, FeatureExtractor
from .models import ModelSpec, SourceModel, create_source_model, set_torch_threads, shared_input_config
from .options import check_output_dir


def default_cache_dir() -> Path:
    """``$AUTOTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/autotl/features`` (``~/.cache/autotl/features``)."""
    env = os.environ.get("AUTOTL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "autotl" / "features"


def default_candidates(zoo: str = "auto", device: torch.device | None = None) -> list[SourceModel]:
    """The candidate source models ``--models`` selects (loaded): by default every packaged ImageNet
    model installed, plus the hub zoo's models for ``device`` whose weights are cached or can be
    downloaded now (``autotl.zoo``)."""
    from .zoo import zoo_models

    return zoo_models(zoo, device)


def default_run_dir(data_dir: str | os.PathLike, kind: str = "") -> Path:
    """``runs/<data>[-<kind>]-<time>``: where a command writes when no ``--out`` is given."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "-".join(p for p in (Path(data_dir).resolve().name, kind, stamp) if p)


def resolve_cache_dir(cache_dir: str | os.PathLike | None, flag: str = "--cache-dir") -> Path | None:
    """The feature cache folder to use: ``cache_dir`` (default: ``default_cache_dir()``) when it can be
    created and written, else None (no disk cache) with a warning: a read-only cache costs time, not the run."""
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        _console.log(_console.clean_text(f"{flag} {path}: cannot write there ({exc.strerror or exc}); running without the "
                                         "disk feature cache (features are computed again next time)"), markup=False)
        return None
    return path


def check_run_folder(out: Path, data_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a ``--out`` autotl must not write to, before any work starts: what ``check_output_dir``
    refuses (a file, an unwritable place, the data folder, a folder inside it or holding it: the
    next scan would see the run's files as a class); a folder of other files; a finished run,
    unless ``--resume`` continues it or ``--overwrite`` replaces it."""
    check_output_dir("--out", out, data=[data_dir], run_folder_ok=True)
    internal = (LOCK_NAME, SET_ASIDE, DISCARDED)
    if out.is_dir() and any(p.name not in internal for p in out.iterdir()) and not is_run_folder(out):
        raise AutotlError(f"--out {out}: holds files that are not an autotl run; give a new or empty folder "
                          "(autotl replaces only its own runs)")
    if is_finished(out) and not (resume or overwrite):
        also = ", --resume to continue its search" if (out / "study.db").exists() else ""
        raise AutotlError(f"--out {out}: holds an earlier run (model.json); add --overwrite to replace it{also}, "
                          "or give another --out")


def check_continuation(out: Path, *, resume: bool, overwrite: bool, search: bool = True, storage: str | None = None) -> None:
    """What a fit may do with the run already in ``out``: ``--resume`` needs a search to continue
    (a study in the folder, or ``--storage``); an unfinished search is continued (``--resume``) or
    replaced (``--overwrite``), never mixed into a new run. Other leftovers of a run that never
    published are replaced."""
    has_study = (out / "study.db").exists()
    if resume and not storage and not has_study:
        if is_finished(out):
            raise AutotlError(f"--resume: {out} holds a run fitted without a search (no study.db), nothing to continue; "
                              "use --overwrite instead of --resume to replace it, or give another --out")
        raise AutotlError(f"--resume: {out} holds no search to continue (no study.db); drop --resume to start one")
    if has_study and not (resume or overwrite):
        fix = "add --resume to continue it, --overwrite to replace it" if search else "add --overwrite to replace it"
        what = "an earlier run" if is_finished(out) else "an unfinished search"
        raise AutotlError(f"--out {out}: holds {what} with its study (study.db); {fix}, or give another --out")


class RunFolder:
    """A fit's hold on its run folder (see :func:`claim_run_folder`).

    The earlier run is set aside into ``OUT/.autotl-replaced``; ``.complete`` is written there once
    every file is moved, so whenever a kill comes the next fit can tell (``recover``) whether the
    folder holds the earlier run's files (no ``.complete``: put them all back), a new run that never
    published (remove it, put the earlier run back) or a published one (``model.json``: drop the
    earlier run, first renamed to ``OUT/.autotl-discarded`` so it is never half put back)."""

    def __init__(self, path: Path, created: list[Path], foreign: list[Path]):
        self.path = path
        self.created = created  # folders this command created, deepest first
        self.foreign = foreign  # what the user keeps there (never moved or deleted)
        self.aside: Path | None = None  # the earlier run, while this one is not published
        self.replaced_finished = False  # ... and it was a finished run

    def _log(self, message: str) -> None:
        _console.log(_console.clean_text(message), markup=False)

    def recover(self) -> None:
        """Finish what a killed fit left: see the class docstring."""
        _remove(self.path / DISCARDED)
        aside = self.path / SET_ASIDE
        if not aside.is_dir():
            return
        if (aside / _COMPLETE).exists():
            if (self.path / "model.json").exists():
                self._drop(aside)
                return
            self._remove_this_run()
        self._put_back(aside)
        self._log(f"{self.path}: put back the earlier run that an interrupted --overwrite had set aside")

    def begin(self, *, resume: bool, data_dir: Path) -> None:
        """Set the earlier run aside (not with ``resume``: that run is continued) and mark the folder."""
        if self.foreign:
            shown = ", ".join(p.name + ("/" if p.is_dir() else "") for p in self.foreign[:5])
            more = f" and {len(self.foreign) - 5} more" if len(self.foreign) > 5 else ""
            self._log(f"{self.path}: keeps {shown}{more} as they are (not written by autotl: never moved or deleted)")
        earlier = autotl_entries(self.path)
        if earlier and not resume:
            finished, aside = is_finished(self.path), self.path / SET_ASIDE
            aside.mkdir()
            try:
                for entry in earlier:
                    os.replace(entry, aside / entry.name)
                (aside / _COMPLETE).touch()
                _mark(self.path, data_dir)
            except BaseException:  # nothing of this run exists yet (the marker is written atomically, last)
                self._put_back(aside)
                raise
            self.aside, self.replaced_finished = aside, finished
            if finished:
                self._log(f"the earlier run in {self.path} is set aside until this one is published "
                          "(it is put back if this one fails)")
        elif not (resume and (self.path / RUN_MARKER).is_file()):
            _mark(self.path, data_dir)

    def commit(self) -> None:
        """The new run is published: the earlier one goes."""
        if self.aside is not None:
            self._drop(self.aside)
            if self.replaced_finished:
                self._log(f"replaced the earlier run in {self.path}")
            self.aside = None

    def discard_earlier(self) -> None:
        """Keep the new (interrupted, resumable) run; leftovers of an unfinished earlier run go."""
        self.commit()

    def roll_back(self) -> bool:
        """This run failed: remove what it wrote and put the earlier run back. True when a finished
        earlier run is back in place."""
        self._remove_this_run()
        if self.aside is None:
            return False
        self._put_back(self.aside)
        self.aside = None
        if self.replaced_finished:
            self._log(f"the earlier run in {self.path} is back in place (this run failed before it was published)")
        return self.replaced_finished

    def _remove_this_run(self) -> None:
        for entry in autotl_entries(self.path):
            _remove(entry)

    def _put_back(self, aside: Path) -> None:
        (aside / _COMPLETE).unlink(missing_ok=True)  # from here on, whatever is in it is the earlier run's
        for entry in sorted(aside.iterdir()):
            os.replace(entry, self.path / entry.name)
        aside.rmdir()

    def _drop(self, aside: Path) -> None:
        trash = self.path / DISCARDED
        _remove(trash)
        os.replace(aside, trash)
        _remove(trash)

    def remove_created(self) -> None:
        """The folders this command created, when nothing is left in them."""
        for folder in self.created:
            with contextlib.suppress(OSError):
                folder.rmdir()


_COMPLETE = ".complete"
# values a run's memory keeps (within its byte bound): the probe table, the reduced features of each
# layout trials read (backbones x taps x flip), widths and pools; fewer would evict layouts trials
# come back to
RUN_MEMORY_ITEMS = 32


def _mark(out: Path, data_dir: Path) -> None:
    """Create ``out`` and write its marker: this folder is an autotl run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutotlError(f"--out {out}: cannot create it ({exc.strerror or exc}); give a folder you can write to") from None
    if not (out / RUN_MARKER).is_file():
        atomic_write_json(out / RUN_MARKER, {"autotl": __version__, "data_dir": str(data_dir.resolve()),
                                             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _make_folders(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); the ones created, deepest first."""
    missing = []
    p = Path(os.path.abspath(out))
    while not p.exists():
        missing.append(p)
        p = p.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutotlError(f"--out {out}: cannot create it ({exc.strerror or exc}); give a folder you can write to") from None
    return missing


@contextlib.contextmanager
def claim_run_folder(out: str | os.PathLike, data_dir: str | os.PathLike, *, resume: bool = False,
                     overwrite: bool = False, search: bool = True, storage: str | None = None,
                     keep_on: tuple[type[BaseException], ...] = ()) -> Iterator[RunFolder]:
    """Own the run folder ``out`` for one fit, from the checks to the publication.

    Before anything is written: ``check_run_folder`` and ``check_continuation``. Then the folder is created, locked
    (``autotl._runfolder.hold_run_folder``: a second fit there is refused), checked again under
    the lock, and the earlier run's files are set aside (``OUT/.autotl-replaced``) unless
    ``resume`` continues it; files autotl did not write stay where they are. When the block
    completes, the earlier run is deleted. When it raises, what this run wrote is removed and the
    earlier run put back (a folder this command created is removed); an exception in ``keep_on``
    (an interrupted search: resumable) keeps the new run unless it was replacing a finished one.
    An exception that put a finished run back gets ``restored_earlier_run = True``."""
    out, data_dir = Path(out), Path(data_dir)
    check_output_dir("--out", out, data=[data_dir], run_folder_ok=True)
    if not any((out / name).exists() for name in (SET_ASIDE, DISCARDED)):  # (else: recovered first, then checked)
        check_run_folder(out, data_dir, resume=resume, overwrite=overwrite)
        check_continuation(out, resume=resume, overwrite=overwrite, search=search, storage=storage)
    created = _make_folders(out)
    folder = RunFolder(out, created, [])
    try:
        with hold_run_folder(out, flag="--out", command="fit"):
            folder.recover()
            check_run_folder(out, data_dir, resume=resume, overwrite=overwrite)  # again: now nobody else changes it
            check_continuation(out, resume=resume, overwrite=overwrite, search=search, storage=storage)
            folder.foreign = foreign_entries(out)
            folder.begin(resume=resume, data_dir=data_dir)  # undoes itself if it fails
            try:
                yield folder
            except BaseException as exc:
                if resume and not created:
                    raise  # the folder is the earlier run, continued: nothing to put back
                if isinstance(exc, keep_on) and not folder.replaced_finished:
                    folder.discard_earlier()
                    raise
                if folder.roll_back():
                    with contextlib.suppress(AttributeError, TypeError):
                        exc.restored_earlier_run = True
                raise
            folder.commit()
    finally:
        folder.remove_created()


class Phases:
    """Seconds spent in each named phase of a run (scan, scoring, search, ...), in the order they
    first ended (a nested phase before the one around it). Exclusive: the time of a phase nested in
    another counts for the inner one only, so the phases never sum to more than the wall time. A
    phase entered twice accumulates.

    ``peak_mb``: the process's memory high-water mark when each phase (last) ended; ``peak_phase``:
    the phase in which it last rose (where the run's peak memory was reached)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        self.peak_phase: str | None = None
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
            mb = round(peak_rss_mb(), 1)
            if mb > max(self.peak_mb.values(), default=0.0):  # the mark rose during this phase (not in a nested one)
                self.peak_phase = name
            self.peak_mb[name] = mb
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

    model: Any  # autotl.fitted.Fitted: the selected (or only) model
    decided_by: dict[str, str]
    notes: dict[str, Any] = field(default_factory=dict)  # search params, the strategy in words, what each strategy did
    search: dict[str, Any] | None = None
    # an ensemble chosen after the search (autotl.ensemble.EnsembleMember, in the graph's order);
    # empty: the single model is published
    members: list[Any] = field(default_factory=list)

    @property
    def source(self) -> SourceModel:
        """The source model whose preprocessing the exported graph takes (its first member's)."""
        return self.members[0].source if self.members else self.model.source


@dataclass
class Run:
    """One ``fit``: data index, run folder, device, caches and the loaded candidate models."""

    index: DatasetIndex
    run_dir: Path
    device: torch.device
    cache_dir: Path | None  # None: no disk cache (the folder was not writable)
    sources: dict[str, SourceModel]  # label -> model, in the order given (ranked after scoring)
    extractors: dict[str, SharedActivations]  # label -> the one activation cache of that model
    seed: int = 0
    val_fraction: float = 0.1  # of the automatic val split (recorded for workers rebuilding the same split)
    duplicates: str = "warn"  # what the scan did with byte-identical copies (workers scan the same way)
    start: float = field(default_factory=time.monotonic)
    # what steps and trials share within this run (probe feature reductions, ...); bounded, never global
    memory: BoundedMemory = field(default_factory=lambda: BoundedMemory(RUN_MEMORY_ITEMS))
    policy: DevicePolicy | None = None  # how the run uses ``device``, resolved once (None: the device's default)
    phases: Phases = field(default_factory=Phases)

    def __post_init__(self) -> None:
        self.policy = as_policy(self.policy if self.policy is not None else self.device)

    @classmethod
    def open(cls, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
             models: Sequence[str | ModelSpec] = (), val_fraction: float = 0.1, seed: int = 0,
             device: str | torch.device | DevicePolicy | None = "auto", cache_dir: str | os.PathLike | None = None,
             index: DatasetIndex | None = None, resume: bool = False, overwrite: bool = False,
             duplicates: str = "warn", zoo: str | None = None, path_column: str | None = None,
             label_column: str | None = None, claimed: bool = False, run_folder: bool = True) -> "Run":
        """``models``: the named candidates; ``zoo`` (``--models``) adds the ones it selects, and
        selects them alone (``auto`` by default) when none is named (``default_candidates``).
        ``claimed``: ``out`` is held by :func:`claim_run_folder` (checked, locked, marked); else it is
        checked here and created and marked after the scan. ``run_folder=False``: ``out`` is the output
        folder of another command (``autotl dropout``), which checks and creates it itself."""
        start = time.monotonic()
        phases = Phases()
        set_torch_threads()
        data_dir = Path(data_dir)
        run_dir = Path(out) if out is not None else default_run_dir(data_dir)
        if run_folder and not claimed:
            check_run_folder(run_dir, data_dir, resume=resume, overwrite=overwrite)
        if index is None:
            with phases("scan"):
                index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed, duplicates=duplicates,
                                     path_column=path_column, label_column=label_column)
            _console.log(index.summary_table())
        if run_folder and not claimed:
            _mark(run_dir, data_dir)
        policy = as_policy(device)
        configure_torch(policy)
        cache = resolve_cache_dir(cache_dir)
        with phases("model loading"):
            loaded = [create_source_model(m) for m in models]
            if zoo is not None or not loaded:
                named = {s.label for s in loaded}
                loaded += [s for s in default_candidates(zoo or "auto", policy.device) if s.label not in named]
        shared = shared_input_config([s.data_config for s in loaded])
        for s in loaded:  # one preprocessing for the run: any mix of backbones reads the same input
            s.share_input(shared)
        sources = {s.label: s for s in loaded}
        if len(sources) != len(loaded):
            raise AutotlError("--model: the same model is given twice; give each candidate once")
        decoded = DecodedImages(cache)  # every candidate's passes share one decode of each image
        extractors = {label: SharedActivations(FeatureExtractor(s, device=policy, cache_dir=cache, decoded=decoded), index.train,
                                               index.val, index.test) for label, s in sources.items()}
        return cls(index, run_dir, policy.device, cache, sources, extractors, seed, float(val_fraction), duplicates,
                   start, policy=policy, phases=phases)

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

    def release_caches(self) -> None:
        """After the evaluation nothing reads the activation caches or the probe reductions any more:
        unmap the caches (their pages count as resident while mapped; a later read maps them again),
        empty the run's memory and give the freed heap back, before export builds its graphs."""
        for ex in self.extractors.values():
            ex.release()
        self.memory.clear()
        trim_heap()

    def forward_batches(self) -> int:
        """Batches pushed through any candidate's backbone so far (trials record their own share)."""
        return sum(e.forward_batches for e in self.extractors.values())

    def seconds(self) -> float:
        return time.monotonic() - self.start

    def phase(self, name: str):
        """``with run.phase("scoring"): ...``: that time is the phase's on the card and in the report."""
        return self.phases(name)
