"""Every option checked before any work starts: one ``AutotlError`` line naming the flag and the fix.

Each API function that the CLI calls runs its ``check_*_options`` first (``fit``, ``score``,
``inspect_dropout``, ``predict``, ``write_report``, ``join_study``), so a typo costs nothing: no
model is loaded, no feature pass runs, nothing is written. The one check that needs a loaded model
(``--frozen-stages`` against the model's stage count) is :func:`check_frozen_stages`, run by
``score_models`` before its feature pass.

This module imports nothing heavy at import time (no torch, numpy or optuna): ``predict`` and
``report`` use it too. Messages name the flag as the CLI spells it (``--batch-size``), which is
also the API's keyword with ``_`` for ``-``.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from ._runfolder import RUN_FILES, is_run_folder
from .errors import AutotlError
from .train_config import OBJECTIVES

__all__ = [
    "check_fit_options", "check_score_options", "check_dropout_options", "check_predict_options",
    "check_report_options", "check_worker_options", "check_frozen_stages", "check_device", "check_out_dir",
    "check_out_file", "check_output_file", "check_output_dir", "check_int", "check_number", "check_columns", "parse_tau",
]

_MAX_SEED = 2**63 - 1


# ------------------------------------------------------------------------------------------ values
def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def check_int(flag: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              what: str = "a whole number") -> int:
    """``value`` as an int in [minimum, maximum] (a bool or a float with a fraction is refused)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, float) and value.is_integer():
        ok, value = True, int(value)
    if not ok:
        raise AutotlError(f"{flag} {_shown(value)}: give {what}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise AutotlError(f"{flag} {value}: give {what} of at least {minimum}")
    if maximum is not None and value > maximum:
        raise AutotlError(f"{flag} {value}: give {what} of at most {maximum}")
    return value


def check_number(flag: str, value: Any, *, positive: bool = False, non_negative: bool = False,
                 below: float | None = None, at_most: float | None = None, hint: str = "") -> float:
    """``value`` as a finite float (nan and inf are refused), optionally > 0, >= 0, < below, <= at_most."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise AutotlError(f"{flag} {_shown(value)}: give a number{hint}")
    x = float(value)
    if not math.isfinite(x):
        raise AutotlError(f"{flag} {value}: give a finite number{hint}")
    if positive and not x > 0:
        raise AutotlError(f"{flag} {value:g}: give a number above 0{hint}")
    if non_negative and not x >= 0:
        raise AutotlError(f"{flag} {value:g}: give a number of at least 0{hint}")
    if below is not None and not x < below:
        raise AutotlError(f"{flag} {value:g}: give a number below {below:g}{hint}")
    if at_most is not None and not x <= at_most:
        raise AutotlError(f"{flag} {value:g}: give a number of at most {at_most:g}{hint}")
    return x


def check_seed(flag: str, value: Any) -> int:
    return check_int(flag, value, minimum=0, maximum=_MAX_SEED, what="a whole number")


def check_fraction(flag: str, value: Any, what: str = "share") -> float:
    x = check_number(flag, value)
    if not 0.0 < x < 1.0:
        raise AutotlError(f"{flag} {value:g}: give a {what} between 0 and 1 (e.g. 0.1 for 10 %)")
    return x


def check_choice(flag: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise AutotlError(f"{flag} {_shown(value)}: use one of {', '.join(choices)}")
    return value


def check_name(flag: str, value: Any, what: str, *, optional: bool = True) -> str:
    """A non-empty name without control characters (study names, class names)."""
    if not isinstance(value, str) or not value.strip():
        hint = f" (or leave {flag} out for the default)" if optional else ""
        raise AutotlError(f"{flag} {_shown(value)}: give a non-empty {what}{hint}")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise AutotlError(f"{flag} {value!r}: contains control characters; give a plain {what}")
    return value


# ------------------------------------------------------------------------------------------ device
def check_device(flag: str, device: Any) -> None:
    """``auto``/None, ``cpu``, ``cuda``/``cuda:N`` (only with that CUDA device present) or ``mps`` (when
    available); from the API also a ``DevicePolicy`` (its device is checked)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return
    import torch

    from .device import DevicePolicy

    if isinstance(device, DevicePolicy):
        device = device.device
    fix = "use --device auto, cpu, cuda or cuda:N"
    if isinstance(device, torch.device):
        dev = device
    else:
        try:
            dev = torch.device(str(device))
        except (RuntimeError, ValueError, TypeError):
            raise AutotlError(f"{flag} {device}: not a device; {fix}") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AutotlError(f"{flag} {device}: no CUDA device is available here; use --device cpu (or auto)")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise AutotlError(f"{flag} {device}: this machine has {n} CUDA device(s) (cuda:0 to cuda:{n - 1}); "
                              "give one of those, or --device auto")
        return
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise AutotlError(f"{flag} {device}: no Apple MPS device is available here; use --device cpu (or auto)")
        return
    raise AutotlError(f"{flag} {device}: autotl runs on cpu, cuda or mps; {fix}")


# ------------------------------------------------------------------------------------------ paths
def _nearest_existing(path: Path) -> Path | None:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return None


def _check_writable_parent(flag: str, path: Path, kind: str) -> None:
    """The closest existing folder above ``path`` (which does not exist yet) must be a folder we can write to."""
    absolute = Path(os.path.abspath(path))
    parent = _nearest_existing(absolute.parent)
    if parent is None:
        raise AutotlError(f"{flag} {path}: none of its parent folders exists; give a {kind} under an existing folder")
    if not parent.is_dir():
        raise AutotlError(f"{flag} {path}: {parent} is a file, not a folder; give a {kind} path inside a folder")
    _check_writable_dir(flag, path, parent, kind)


def _check_writable_dir(flag: str, path: Path, folder: Path, kind: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AutotlError(f"{flag} {path}: cannot write in {folder} (permission denied); give a {kind} you can write to")
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):  # no statvfs (Windows) or cannot tell: the write will say
        read_only = False
    if read_only:
        raise AutotlError(f"{flag} {path}: {folder} is on a read-only file system; give a {kind} you can write to")


def check_out_dir(flag: str, path: str | os.PathLike | None) -> None:
    """A folder autotl will create or write into: not a file, and writable (or creatable)."""
    if path is None:
        return
    path = Path(path).expanduser()
    if str(path).strip() == "":
        raise AutotlError(f"{flag} '': give a folder")
    if os.path.lexists(path) and not path.is_dir():
        raise AutotlError(f"{flag} {path}: is a file, not a folder; give a new or existing folder")
    if path.is_dir():
        _check_writable_dir(flag, path, path, "folder")
        return
    _check_writable_parent(flag, path, "folder")


def check_out_file(flag: str, path: str | os.PathLike | None, example: str = "out.txt") -> None:
    """A file autotl will (re)write: not a folder, and writable (or creatable)."""
    if path is None:
        return
    path = Path(path).expanduser()
    if str(path).strip() == "" or path.name in ("", ".", ".."):
        raise AutotlError(f"{flag} {path}: give a file name")
    if path.is_dir():
        raise AutotlError(f"{flag} {path}: is a folder; give a file name (e.g. {path / example})")
    if os.path.lexists(path) and not path.is_file():
        raise AutotlError(f"{flag} {path}: is not a regular file; give a file name")
    # files are written atomically (temp file + rename in the same folder): the folder must be writable
    _check_writable_parent(flag, path, "file")


# ------------------------------------------------------------------------------------------ what autotl may replace
# One rule for every file and folder autotl writes: it never replaces what the command reads (an
# input image, a model and its card), a data folder's content, or a run's files (model.onnx,
# model.json, ...) unless that file is the command's own output. Every command checks its targets
# here before any work starts.
_MODEL_EXTENSIONS = (".onnx",)


def _real(path: Any) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return _real(a) == _real(b)


def check_output_file(flag: str, path: str | os.PathLike | None, *, inputs: Iterable[Any] = (), data: Iterable[Any] = (),
                      own: Iterable[str] = (), example: str = "out.txt") -> None:
    """A file a command (re)writes: ``check_out_file``'s checks, then the rule above. ``inputs``:
    files the command reads; ``data``: folders it reads (nothing in them is replaced, no image is
    added); ``own``: names of run files that are this command's output (``report.html``). An
    existing image or ONNX model is never replaced by another kind of file."""
    if path is None:
        return
    from ._images import is_image_path  # numpy + Pillow: only when there is a file to check

    check_out_file(flag, path, example)
    target, real = Path(os.path.expanduser(os.fspath(path))), _real(path)
    fix = f"give another file name (e.g. {example})"
    for source in inputs:
        if source is not None and os.path.lexists(target) and _same_file(target, Path(os.fspath(source))):
            raise AutotlError(f"{flag} {target}: is {source}, which this command reads; {fix}")
    for folder in data:
        if folder is not None and _within(real, _real(folder)) and (os.path.lexists(target) or is_image_path(target)):
            what = "replace a file" if os.path.lexists(target) else "add an image"
            raise AutotlError(f"{flag} {target}: would {what} in {folder}, a folder this command reads; {fix} outside it")
    suffix = target.suffix.lower()
    kept_kind = is_image_path(target) or suffix in _MODEL_EXTENSIONS
    if os.path.lexists(target) and kept_kind and Path(example).suffix.lower() != suffix:
        raise AutotlError(f"{flag} {target}: is {'a model' if suffix in _MODEL_EXTENSIONS else 'an image'}, not "
                          f"a {Path(example).suffix or 'output'} file; {fix}")
    if target.name in RUN_FILES and target.name not in set(own) and is_run_folder(real.parent):
        raise AutotlError(f"{flag} {target}: is a file of the run in {target.parent} (written by autotl fit); {fix}")


def check_output_dir(flag: str, path: str | os.PathLike | None, *, data: Iterable[Any] = (),
                     run_folder_ok: bool = False) -> None:
    """A folder a command writes its files into: ``check_out_dir``'s checks, then neither a folder
    of ``data``, nor inside one (the next scan would take it for a class), nor holding one; nor
    (unless ``run_folder_ok``: fit's own) the run folder of a fit, whose files it would replace."""
    if path is None:
        return
    path = Path(os.path.expanduser(os.fspath(path)))
    real = _real(path)
    for folder in data:
        if folder is None:
            continue
        d = _real(folder)
        if _within(real, d) or d in real.parents:
            raise AutotlError(f"{flag} {path}: is the data folder {folder} or overlaps it; give a folder outside the "
                              "data (e.g. runs/NAME)")
    check_out_dir(flag, path)
    if not run_folder_ok and path.is_dir() and is_run_folder(path):
        raise AutotlError(f"{flag} {path}: is the run folder of an `autotl fit`, whose files this would replace; "
                          "give another folder")


def _check_cache_dir(cache_dir: Any) -> None:
    if cache_dir is None:
        return
    path = Path(cache_dir).expanduser()
    if os.path.lexists(path) and not path.is_dir():
        raise AutotlError(f"--cache-dir {path}: is a file, not a folder; give a folder for the feature cache")


def _check_existing_dir(flag: str, path: Any, what: str) -> Path:
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.exists():
        raise AutotlError(f"{flag} {p}: does not exist; give {what}")
    if not p.is_dir():
        raise AutotlError(f"{flag} {p}: is not a folder; give {what}")
    return p


# ------------------------------------------------------------------------------------------ fit
def _check_frozen_value(value: Any) -> None:
    if value is None or value == "all":
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise AutotlError(f"--frozen-stages {_shown(value)}: give a number of stages (N, or -N = all but the last N) or 'all'")


def check_frozen_stages(frozen: Any, num_stages: int, model: str = "the model") -> int:
    """``--frozen-stages`` against a loaded model: N in [0, stages], -N in [-stages, -1] or 'all'."""
    _check_frozen_value(frozen)
    if frozen is None or frozen == "all":
        return int(num_stages)
    n = int(frozen)
    resolved = num_stages + n if n < 0 else n
    if not 0 <= resolved <= num_stages:
        raise AutotlError(f"--frozen-stages {n}: {model} has {num_stages} stages; give 0 to {num_stages}, "
                          f"-1 to -{num_stages} (all but the last N) or 'all'")
    return resolved


def _check_train_config(cfg: Any) -> None:
    """The training values (``fit``'s flags, or a ``TrainConfig`` passed as ``config``)."""
    check_int("--epochs", cfg["epochs"], minimum=1)
    check_int("--batch-size", cfg["batch_size"], minimum=1)
    check_number("--lr", cfg["lr"], positive=True, hint=" (the head's learning rate, e.g. 3e-3)")
    _check_frozen_value(cfg["frozen_stages"])
    if cfg.get("objective") is not None:
        check_choice("--objective", cfg["objective"], OBJECTIVES)


def _check_time_budget(value: Any) -> None:
    if value is None:
        return
    from ._recipe import parse_duration

    if isinstance(value, str) and not value.strip():
        raise AutotlError("--time-budget '': give a duration like 90s, 20m, 1h or 1h30m")
    parse_duration(value)  # AutotlError for garbage, <= 0, nan, inf


def _check_retrieval(fixed: Mapping[str, Any], options: Mapping[str, Any], data_dir: Any = None) -> None:
    pool = options.get("source_pool")
    if pool is not None and not (isinstance(pool, str) and not pool.strip()):
        p = _check_existing_dir("--source-pool", pool, "a folder with one sub-folder of images per source class")
        d = _real(data_dir) if data_dir is not None else None
        if d is not None and (_within(_real(p), d) or _real(p) in d.parents):
            raise AutotlError(f"--source-pool {p}: is the data folder {data_dir} or overlaps it; the pool's images would "
                              "train beside the images that validate; give a folder of other images")
    elif pool is not None:
        raise AutotlError("--source-pool '': give a folder with one sub-folder of images per source class")
    k = fixed.get("retrieval_k")
    if k is not None:
        check_int("--retrieval-k", k, minimum=0, what="a whole number (neighbours per target image; 0 = off)")
    bank = fixed.get("retrieval_bank")
    if bank is not None:
        from .retrieval.neighbours import BANKS

        if not isinstance(bank, str) or bank.lower() not in BANKS:
            raise AutotlError(f"--retrieval-bank {_shown(bank)}: use one of {', '.join(BANKS)}")
    weight = fixed.get("source_loss_weight")
    if weight is not None:
        check_number("--source-loss-weight", weight, non_negative=True, hint=" (the source task's loss weight, default 1)")
    given = [f"--{name.replace('_', '-')}" for name in ("retrieval_k", "retrieval_bank", "source_loss_weight")
             if fixed.get(name) is not None]
    if not pool and given and not (given == ["--retrieval-k"] and int(k) == 0):
        raise AutotlError(f"{', '.join(given)}: only selective joint fine-tuning uses {'it' if len(given) == 1 else 'them'}; "
                          "give --source-pool DIR too (source images, one sub-folder per class), or drop "
                          f"{'it' if len(given) == 1 else 'them'}")
    if k is not None and int(k) == 0 and (bank is not None or weight is not None):
        flags = [f for f in given if f != "--retrieval-k"]
        raise AutotlError(f"{', '.join(flags)} with --retrieval-k 0: retrieval is off, so {'it has' if len(flags) == 1 else 'they have'} "
                          "no effect; give --retrieval-k 1 or more, or drop them")


def parse_tau(value: Any) -> float | None:
    """``None``/``"none"``/``"off"``/``inf`` → ``None`` (no dropout); otherwise a float >= 0."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null", "off", "no", "inf", "infinity"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise AutotlError(f"dropout_tau {value!r}: give a number >= 0, or 'none' for no dropout") from None
    tau = float(value)
    if math.isinf(tau) and tau > 0:
        return None
    if not tau >= 0:
        raise AutotlError(f"dropout_tau {value!r}: must be >= 0 (or 'none' for no dropout)")
    return tau


def _check_dropout_fixed(fixed: Mapping[str, Any], options: Mapping[str, Any]) -> None:
    tau_given = "dropout_tau" in fixed and fixed["dropout_tau"] is not None
    tau = None
    if tau_given:
        try:
            tau = parse_tau(fixed["dropout_tau"])
        except AutotlError as exc:
            raise AutotlError("--dropout-tau" + str(exc)[len("dropout_tau"):]) from None
    focus = options.get("focus_class")
    if focus is not None:
        check_name("--focus-class", focus, "class name")
        if tau_given and tau is None:
            raise AutotlError("--focus-class with --dropout-tau none: the focus class only changes data dropout, which is "
                              "off; give --dropout-tau 0 or more, or drop --focus-class")


def check_fit_options(*, data_dir: Any = None, out: Any = None, models: Any = (), search: Any = None,
                      trials: Any = None, time_budget: Any = None, recipe: Any = None, storage: Any = None,
                      study: Any = None, top_k: Any = None, cv_folds: Any = 5, frozen_stages: Any = "all",
                      epochs: Any = 15, lr: Any = 3e-3, batch_size: Any = 64, objective: Any = None,
                      val_fraction: Any = 0.1, seed: Any = 0, device: Any = "auto", cache_dir: Any = None,
                      config: Any = None, fixed_params: Any = None, options: Any = None, duplicates: Any = "warn",
                      quantize: Any = None, zoo: Any = None, path_column: Any = None, label_column: Any = None,
                      resume: Any = False, overwrite: Any = False, **_other: Any) -> None:
    """Every ``autotl.fit.fit`` argument that can be checked without reading the data or loading a
    model (called with ``fit``'s ``locals()``; arguments it does not know are left to ``fit``)."""
    if data_dir is None or (isinstance(data_dir, str) and not data_dir.strip()):
        raise AutotlError("DATA_DIR: give the folder of images (one sub-folder per class, or train/ val/ [test/]) "
                          "or a label file (CSV of image paths and labels)")
    check_columns(path_column=path_column, label_column=label_column)
    if zoo is not None:
        from .zoo import ZOO_CHOICES

        check_choice("--models", zoo, ZOO_CHOICES)
    if config is not None:
        from dataclasses import asdict

        values = asdict(config)
        values["objective"] = objective if objective is not None else values.get("objective")
    else:
        values = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "frozen_stages": frozen_stages, "objective": objective}
    _check_train_config(values)
    check_fraction("--val-fraction", val_fraction, "validation share")
    check_seed("--seed", seed)
    check_device("--device", device)
    _check_cache_dir(cache_dir)
    check_quantize(quantize)
    from .duplicates import DUPLICATE_MODES

    if duplicates not in DUPLICATE_MODES:
        raise AutotlError(f"--duplicates {duplicates!r}: use one of {', '.join(DUPLICATE_MODES)} (e.g. drop)")
    if models:
        if isinstance(models, str):
            raise AutotlError(f"models={models!r}: give a list of model names (e.g. [{models!r}])")
        for m in models:
            if isinstance(m, str) and not m.strip():
                raise AutotlError("--model '': give a timm model name (NAME, NAME@SIZE, NAME=CHECKPOINT or NAME=random)")
    if trials is not None:
        check_int("--trials", trials, minimum=1)
    _check_time_budget(time_budget)
    if top_k is not None:
        check_int("--top-k", top_k, minimum=1, what="a number of candidate models")
    check_int("--cv-folds", cv_folds, minimum=2, what="a number of folds")
    if study is not None:
        check_name("--study", study, "study name")
    if storage is not None:
        if not isinstance(storage, str) or not storage.strip():
            raise AutotlError(f"--storage {_shown(storage)}: give an Optuna storage URL (sqlite:///study.db, "
                              "postgresql://user@host/db) or leave it out for RUN_DIR/study.db")
    if recipe is not None and search is not False:
        from ._recipe import load_recipe

        load_recipe(recipe)  # a typo in the name or the file is reported now, not after the scoring pass
    if resume and overwrite:
        raise AutotlError("--resume with --overwrite: --resume continues the search in --out, --overwrite replaces the "
                          "run there; give one of them")
    fixed, opts = dict(fixed_params or {}), dict(options or {})
    _check_dropout_fixed(fixed, opts)
    _check_retrieval(fixed, opts, data_dir)
    check_out_dir("--out", out if out is not None else "runs")


def check_columns(**columns: Any) -> None:
    """``--path-column`` / ``--label-column``: a column name of the label file, when given."""
    for name, value in columns.items():
        if value is not None:
            check_name("--" + name.replace("_", "-"), value, "column name of the label file's header")


# ------------------------------------------------------------------------------------------ others
def check_score_options(*, out: Any = None, val_fraction: Any = 0.1, seed: Any = 0, device: Any = "auto",
                        cache_dir: Any = None, top: Any = None, cuts: Any = (), path_column: Any = None,
                        label_column: Any = None, data_dir: Any = None, **_other: Any) -> None:
    check_columns(path_column=path_column, label_column=label_column)
    check_fraction("--val-fraction", val_fraction, "validation share")
    check_seed("--seed", seed)
    check_device("--device", device)
    _check_cache_dir(cache_dir)
    if top is not None:
        check_int("--top", top, minimum=1, what="a number of source classes")
    for c in cuts or ():
        _check_frozen_value(c)
    check_output_dir("--out", out, data=[data_dir])


def check_dropout_options(*, tau: Any = None, mode: Any = "spread", focus_class: Any = None, out: Any = None,
                          l2: Any = 1e-2, min_keep_fraction: Any = 0.1, val_fraction: Any = 0.1, seed: Any = 0,
                          device: Any = "auto", cache_dir: Any = None, top: Any = 20, write_clean: Any = None,
                          path_column: Any = None, label_column: Any = None, data_dir: Any = None, **_other: Any) -> None:
    check_columns(path_column=path_column, label_column=label_column)
    try:
        tau_value = parse_tau(tau)
    except AutotlError as exc:
        raise AutotlError("--tau" + str(exc)[len("dropout_tau"):]) from None
    check_choice("--mode", mode, ("spread", "fraction"))
    if mode == "fraction" and tau_value is not None and tau_value > 1:
        raise AutotlError(f"--tau {tau_value:g}: in mode 'fraction' tau is a share in [0, 1]")
    if focus_class is not None:
        check_name("--focus-class", focus_class, "class name")
    check_number("--l2", l2, positive=True, hint=" (the convex head's L2 damping, e.g. 0.01)")
    x = check_number("min_keep_fraction", min_keep_fraction)
    if not 0.0 <= x <= 1.0:
        raise AutotlError(f"min_keep_fraction {min_keep_fraction:g}: give a share from 0 to 1")
    check_fraction("--val-fraction", val_fraction, "validation share")
    check_seed("--seed", seed)
    check_device("--device", device)
    _check_cache_dir(cache_dir)
    check_int("--top", top, minimum=1, what="a number of images")
    check_output_dir("--out", out, data=[data_dir])
    if write_clean is not None:
        check_output_dir("--write-clean", write_clean, data=[data_dir])
        if out is not None and (_within(_real(write_clean), _real(out)) or _real(out) in _real(write_clean).parents):
            raise AutotlError(f"--write-clean {write_clean}: overlaps --out {out}; give the cleaned copy a folder of its own")


QUANTIZE_MODES = ("int8",)


def check_quantize(quantize: Any, *, optional: bool = True) -> None:
    if quantize is None and optional:
        return
    if quantize not in QUANTIZE_MODES:
        raise AutotlError(f"--quantize {_shown(quantize)}: use {' or '.join(QUANTIZE_MODES)} (e.g. --quantize int8)")


def check_predict_options(*, top_k: Any = 5, batch_size: Any = 32, csv: Any = None, model_path: Any = None,
                          paths: Any = (), path_column: Any = None, **_other: Any) -> None:
    """``--csv`` never replaces the model, its card or an image being classified (nor anything in a
    folder being classified)."""
    check_columns(path_column=path_column)
    check_int("--top-k", top_k, minimum=1, what="a number of labels")
    check_int("--batch-size", batch_size, minimum=1)
    if csv is None:
        return
    inputs: list[Path] = []
    if model_path is not None:
        model = Path(os.fspath(model_path))
        model = model / "model.onnx" if model.is_dir() else model
        inputs += [model, model.with_suffix(".json"), model.parent / "model.json"]
    given = [Path(os.fspath(p)) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths or ())]
    check_output_file("--csv", csv, inputs=inputs + [p for p in given if not p.is_dir()],
                      data=[p for p in given if p.is_dir()], example="predictions.csv")


def check_report_options(*, out: Any = None, run_dir: Any = None, data_dir: Any = None, **_other: Any) -> None:
    """``write_report``'s output file, ``out`` or ``RUN_DIR/report.html`` (it checks ``--plots``
    itself: the modes are its own): never one of the run's other files or in its data folder."""
    target = out if out is not None else (Path(os.fspath(run_dir)) / "report.html" if run_dir is not None else None)
    check_output_file("--out", target, data=[data_dir], own={"report.html"}, example="report.html")


def check_worker_options(*, storage: Any = None, study: Any = None, trials: Any = None, out: Any = None,
                         device: Any = "auto", cache_dir: Any = None, heartbeat: Any = None, grace: Any = None,
                         max_retry: Any = None, data_dir: Any = None, artifacts: Any = None, **_other: Any) -> None:
    if not isinstance(storage, str) or not storage.strip():
        raise AutotlError(f"--storage {_shown(storage)}: give the study's Optuna storage URL (e.g. postgresql://user@host/db)")
    check_name("--study", study, "study name", optional=False)
    if trials is not None:
        check_int("--trials", trials, minimum=1)
    check_device("--device", device)
    _check_cache_dir(cache_dir)
    if heartbeat is not None:
        check_int("--heartbeat", heartbeat, minimum=1, what="a number of seconds")
    if grace is not None:
        check_int("--grace", grace, minimum=1, what="a number of seconds")
    if max_retry is not None:
        check_int("--max-retry", max_retry, minimum=0, what="a number of retries")
    if data_dir is not None:
        _check_existing_dir("--data", data_dir, "this host's copy of the study's data folder")
    check_out_dir("--out", out)
    check_out_dir("--artifacts", artifacts)
