"""The run object: what every step of ``autotl fit`` (and a search worker) shares.

``Run.open`` scans the data, picks the device, creates the run folder, loads each candidate source
model once and puts one ``SharedActivations`` (frozen-activation cache) in front of each. Scoring,
the search, the refit and publishing all take the run; nothing below it imports ``autotl.fit``.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import _console
from .activations import SharedActivations
from .data import DatasetIndex, scan_dataset
from .errors import AutotlError
from .features import FeatureExtractor
from .models import DEFAULT_MODEL, ModelSpec, SourceModel, create_source_model, list_packaged_models, set_torch_threads
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
    start: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, data_dir: str | os.PathLike, out: str | os.PathLike | None = None, *,
             models: Sequence[str | ModelSpec] = (), val_fraction: float = 0.1, seed: int = 0,
             device: str | torch.device | None = "auto", cache_dir: str | os.PathLike | None = None,
             index: DatasetIndex | None = None) -> "Run":
        start = time.monotonic()
        set_torch_threads()
        data_dir = Path(data_dir)
        if index is None:
            index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed)
            _console.log(index.summary_table())
        run_dir = Path(out) if out is not None else default_run_dir(data_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dev = device if isinstance(device, torch.device) else pick_device(device)
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        loaded = [create_source_model(m) for m in (list(models) or default_candidates())]
        sources = {s.label: s for s in loaded}
        if len(sources) != len(loaded):
            raise AutotlError("--model: the same model is given twice; give each candidate once")
        extractors = {label: SharedActivations(FeatureExtractor(s, device=dev, cache_dir=cache), index.train, index.val,
                                               index.test) for label, s in sources.items()}
        return cls(index, run_dir, dev, cache, sources, extractors, seed, float(val_fraction), start)

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
