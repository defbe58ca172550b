"""The dry run: score a data folder's training images and show / write what dropout would remove.

No training, no change to the user's folder: scan, one cached forward pass, the convex head, the
influence solve, the selection, then ``dropped.csv`` / ``influence.csv`` / ``dropped.jpg`` in the
output folder and, on request, a cleaned copy of the data set (hard links, or copies).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _console
from .._io import atomic_write_json
from ..errors import AutotlError
from ..models import DEFAULT_MODEL
from ..options import DropoutOptions
from .report import dropout_rows, harmful_table, write_dropout_files
from .strategy import DECIDED_BY, DEFAULT_L2, DEFAULT_MODE, DataDropout, resolve_focus_class

__all__ = ["DropoutInspection", "inspect_dropout", "DEFAULT_INSPECT_TAU"]

# the dry run's default: drop images more than 1 robust spread above the typical score
DEFAULT_INSPECT_TAU = 1.0
_SPLIT_DIRS = {"train", "val", "valid", "validation", "test"}


@dataclass
class DropoutInspection:
    """What ``inspect_dropout`` found (``to_json`` is the ``autotl dropout --json`` document)."""

    data_dir: Path
    out_dir: Path
    source_model: str
    weights_origin: str
    classes: list[str]
    n_train: int
    n_val: int
    summary: dict[str, Any]  # the same record a fit stores in its card (strategy notes)
    top: list[dict[str, Any]]  # the most harmful images (dropped or not), most harmful first
    files: dict[str, str]
    seconds: dict[str, float]
    clean_dir: Path | None = None
    decided_by: dict[str, str] = field(default_factory=dict)

    @property
    def n_dropped(self) -> int:
        return int(self.summary["n_dropped"])

    def to_json(self) -> dict[str, Any]:
        return {
            "data_dir": str(self.data_dir), "out_dir": str(self.out_dir), "source_model": self.source_model,
            "weights_origin": self.weights_origin, "classes": self.classes, "n_train": self.n_train,
            "n_val": self.n_val, "dropout": self.summary, "top": self.top, "files": self.files,
            "seconds": self.seconds, "clean_dir": None if self.clean_dir is None else str(self.clean_dir),
            "decided_by": self.decided_by,
        }


def inspect_dropout(
    data_dir: str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    tau: float | str | None = DEFAULT_INSPECT_TAU,
    mode: str = DEFAULT_MODE,
    focus_class: str | None = None,
    out: str | os.PathLike | None = None,
    l2: float = DEFAULT_L2,
    min_keep_fraction: float = DropoutOptions.dropout_min_keep,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str | None = "auto",
    cache_dir: str | os.PathLike | None = None,
    top: int = 20,
    write_clean: str | os.PathLike | None = None,
    link: bool = True,
    show: bool = True,
    path_column: str | None = None,
    label_column: str | None = None,
) -> DropoutInspection:
    """Score every training image of ``data_dir`` and write what dropout at ``tau`` would drop.

    Same scan, split, model, features and influence as ``autotl fit`` with ``dropout_tau=tau``: the
    decision of data dropout itself (``DataDropout.decide``) in a run of its own; the reference is
    the validation split (or its ``focus_class`` images); the test split is never read.  Writes
    ``dropped.csv``, ``influence.csv`` and ``dropped.jpg`` to ``out`` (default
    ``runs/<data>-dropout-<time>``).  ``write_clean=DIR`` writes a cleaned copy of the data set
    in split layout (``DIR/train/<class>/`` without the dropped images, ``DIR/val/``, ``DIR/test/``
    unchanged), hard-linked when possible (``link=False``: copied); the user's folder is never
    modified. ``data_dir`` may be a label file (``path_column``/``label_column``: see ``autotl.fit``).
    """
    from ..data import scan_dataset
    from ..options import check_dropout_options
    from ..run import Run, default_run_dir
    from ..strategy import StrategyContext
    from ..train import TrainConfig

    check_dropout_options(tau=tau, mode=mode, focus_class=focus_class, out=out, l2=l2, min_keep_fraction=min_keep_fraction,
                          val_fraction=val_fraction, seed=seed, device=device, cache_dir=cache_dir, top=top,
                          write_clean=write_clean, path_column=path_column, label_column=label_column, data_dir=data_dir)
    t_start = time.perf_counter()
    options = DropoutOptions(dropout_tau=tau, dropout_mode=mode, focus_class=focus_class, dropout_l2=l2,
                             dropout_min_keep=min_keep_fraction)
    data_dir = Path(data_dir)
    index = scan_dataset(data_dir, val_fraction=val_fraction, seed=seed, path_column=path_column, label_column=label_column)
    resolve_focus_class(focus_class, index.classes)  # a class name that is not one: said before any model loads
    if not index.val:
        raise AutotlError(f"{data_dir}: no validation images; the influence reference needs a val split")
    clean_dir = _check_clean_dir(write_clean, index.root) if write_clean is not None else None
    out_dir = Path(out) if out is not None else default_run_dir(data_dir, "dropout")
    _console.log(index.summary_table())

    # out_dir is this command's folder, made only when it writes: a failure before leaves none behind
    run = Run.open(data_dir, out_dir, models=[model], val_fraction=val_fraction, seed=seed, device=device,
                   cache_dir=cache_dir, index=index, run_folder=False)
    source, extractor = run.sources[run.labels[0]], run.extractors[run.labels[0]]
    _console.log(f"source model [bold]{source.label}[/] — weights: {source.weights_origin}")
    t0 = time.perf_counter()
    extractor.extract(index.train, description="train features")
    extractor.extract(index.val, description="val features")  # index.test: never
    t_features = time.perf_counter() - t0
    ctx = StrategyContext(index, source, extractor, out_dir, TrainConfig(), list(index.train), memory=run.memory)
    decision = DataDropout().decide(ctx, options)
    res, keep, outcome = decision.outcome.result, decision.keep, decision.outcome
    summary = decision.notes
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {k: str(v) for k, v in write_dropout_files(out_dir, index.train, index.classes, res, keep).items()}
    rows = dropout_rows(index.train, index.classes, res, keep, spread=decision.report.spread)
    if clean_dir is not None:
        _write_clean_copy(index, keep, clean_dir, link=link)
    seconds = {"features": round(t_features, 3), "head_fit": round(outcome.fit_seconds, 3),
               "influence": round(outcome.influence_seconds, 3), "total": round(time.perf_counter() - t_start, 3)}
    decided_by = {"dropout": DECIDED_BY, "test": "not read" if index.test else "no test split given"}
    inspection = DropoutInspection(
        data_dir=index.root, out_dir=out_dir, source_model=source.label, weights_origin=source.weights_origin,
        classes=list(index.classes), n_train=len(index.train), n_val=len(index.val), summary=summary,
        top=[{k: v for k, v in r.items()} for r in rows[: max(0, top)]], files=files, seconds=seconds,
        clean_dir=clean_dir, decided_by=decided_by,
    )
    atomic_write_json(out_dir / "dropout.json", inspection.to_json())
    if show:
        _show(inspection, rows, top)
    return inspection


def _show(ins: DropoutInspection, rows: list[dict], top: int) -> None:
    from rich.markup import escape  # class names and paths are the user's: never markup

    s = ins.summary
    ref = f"{s['n_reference']} val images" + (f" of class '{s['focus_class']}'" if s["focus_class"] else "")
    tau = "off" if s["tau"] is None else f"{s['tau']:g} ({s['mode']})"
    title = f"most harmful training images of {ins.data_dir} (influence on {ref}; > 0: removing it lowers the val loss)"
    _console.log(harmful_table(rows, top=top, title=escape(title), root=ins.data_dir))
    per_class = escape(", ".join(f"{k}: {v}" for k, v in s["dropped_per_class"].items()))
    _console.log(f"tau {tau}: would drop [bold]{s['n_dropped']}[/] of {s['n_total']} training images ({per_class}); "
                 f"{s['n_harmful']} score > 0; influence {ins.seconds['head_fit'] + ins.seconds['influence']:.1f}s "
                 f"({s['solver']}); decided by the {DECIDED_BY}")
    _console.log(escape(f"wrote {ins.files.get('dropped_csv')}" + (f", {ins.clean_dir}" if ins.clean_dir else "")))


# ------------------------------------------------------------------------------------------------
# cleaned copy


def _check_clean_dir(path: str | os.PathLike, data_root: Path) -> Path:
    """A new or empty folder (``check_dropout_options`` has kept it apart from the data already)."""
    from ..options import check_output_dir

    dest = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
    check_output_dir("--write-clean", dest, data=[data_root])
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise AutotlError(f"--write-clean {dest}: exists and is not empty; give a new folder")
    return dest


def _relative_in_class(path: Path, root: Path, class_name: str) -> Path:
    """The path of an image below its class folder (nested folders kept); an image of a label file
    outside a class folder keeps its whole path below the file's folder, so no two images collide."""
    try:
        parts = Path(path).relative_to(root).parts
    except ValueError:  # an absolute path of a label file, elsewhere
        return Path(*Path(path).parts[1:])
    if len(parts) >= 3 and parts[0].lower() in _SPLIT_DIRS and parts[1] == class_name:
        return Path(*parts[2:])
    if len(parts) >= 2 and parts[0] == class_name:
        return Path(*parts[1:])
    return Path(*parts)


def _place(src: Path, dst: Path, link: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:  # another file system, or links not allowed: copy instead
            pass
    shutil.copy2(src, dst)


def _write_clean_copy(index, keep: np.ndarray, dest: Path, *, link: bool) -> None:
    """``dest/train/<class>/`` (kept images), ``dest/val/<class>/``, ``dest/test/<class>/`` (all).

    Written to a temporary sibling folder and renamed into place, so an interrupted run leaves
    no half-written data set.
    """
    tmp = dest.parent / f".{dest.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        kept_train = [s for s, k in zip(index.train, keep) if k]
        for split, samples in (("train", kept_train), ("val", index.val), ("test", index.test)):
            for s in samples:  # file I/O, one call per file
                name = index.classes[s.label]
                _place(Path(s.path), tmp / split / name / _relative_in_class(Path(s.path), index.root, name), link)
        # every class keeps its folder in train/ and val/ (the class guard keeps >= 1 train image)
        for name in index.classes:
            (tmp / "train" / name).mkdir(parents=True, exist_ok=True)
            (tmp / "val" / name).mkdir(parents=True, exist_ok=True)
        if dest.exists():
            dest.rmdir()  # checked empty above
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
