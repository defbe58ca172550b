"""The run object: what every step of ``autotl fit`` (and a search worker) shares.

``Run.open`` scans the data, resolves the device policy (``autotl.device``), creates the run folder,
loads each candidate source model once and puts one ``SharedActivations`` (frozen-activation cache)
in front of each. Scoring,
the search, the refit and publishing all take the run; nothing below it imports ``autotl.fit``.
"""

from __future__ import annotations

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
from ._memory import BoundedMemory
from ._version import __version__
from .activations import SharedActivations
from .data import DatasetIndex, scan_dataset
from .device import DevicePolicy, as_policy, configure_torch
from .errors import AutotlError
from .features import FeatureExtractor
from .models import ModelSpec, SourceModel, create_source_model, set_torch_threads, shared_input_config
from .options import check_out_dir


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
    cache_dir: Path
    sources: dict[str, SourceModel]  # label -> model, in the order given (ranked after scoring)
    extractors: dict[str, SharedActivations]  # label -> the one activation cache of that model
    seed: int = 0
    val_fraction: float = 0.1  # of the automatic val split (recorded for workers rebuilding the same split)
    duplicates: str = "warn"  # what the scan did with byte-identical copies (workers scan the same way)
    start: float = field(default_factory=time.monotonic)
    # what steps and trials share within this run (probe feature reductions, ...); bounded, never global
    memory: BoundedMemory = field(default_factory=lambda: BoundedMemory(16))
    policy: DevicePolicy | None = None  # how the run uses ``device``, resolved once (None: the device's default)

    def __post_init__(self) -> None:
        self.policy = as_policy(self.policy if self.policy is not None else self.device)

    def drop_replaced(self) -> None:
        """After publishing: delete the runs --overwrite moved aside (also those of an overwrite
        that was interrupted before, which this run completes)."""
        for old in self.run_dir.parent.glob(f"{self.run_dir.name}.replaced-*"):
            if old.is_dir() and is_run_folder(old):
                shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def open(cls, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
             models: Sequence[str | ModelSpec] = (), val_fraction: float = 0.1, seed: int = 0,
             device: str | torch.device | DevicePolicy | None = "auto", cache_dir: str | os.PathLike | None = None,
             index: DatasetIndex | None = None, resume: bool = False, overwrite: bool = False,
             duplicates: str = "warn", zoo: str | None = None, path_column: str | None = None,
             label_column: str | None = None) -> "Run":
        """``models``: the named candidates; ``zoo`` (``--models``) adds the ones it selects, and
        selects them alone (``auto`` by default) when none is named (``default_candidates``)."""
        start = time.monotonic()
        set_torch_threads()
        data_dir = Path(data_dir)
        run_dir = Path(out) if out is not None else default_run_dir(data_dir)
        check_run_folder(run_dir, data_dir, resume=resume, overwrite=overwrite)
        if index is None:
            index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed, duplicates=duplicates,
                                 path_column=path_column, label_column=label_column)
            _console.log(index.summary_table())
        prepare_run_folder(run_dir, data_dir, overwrite=overwrite)
        policy = as_policy(device)
        configure_torch(policy)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
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
        extractors = {label: SharedActivations(FeatureExtractor(s, device=policy, cache_dir=cache), index.train,
                                               index.val, index.test) for label, s in sources.items()}
        return cls(index, run_dir, policy.device, cache, sources, extractors, seed, float(val_fraction), duplicates,
                   start, policy=policy)

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
