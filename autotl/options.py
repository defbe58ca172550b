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

import dataclasses
import inspect
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ._runfolder import RUN_FILES, is_run_folder
from .errors import AutotlError
from .train_config import OBJECTIVES, TrainConfig

__all__ = [
    "FitOptions", "SearchOptions", "StrategyOptions", "DropoutOptions", "RetrievalOptions", "FinetuneOptions",
    "ProbeOptions", "STRATEGY_OPTIONS", "Flag", "option", "flag_of", "flag_name", "keyword_signature", "check_score_options", "check_dropout_options",
    "check_predict_options", "check_report_options", "check_worker_options", "check_frozen_stages", "check_device",
    "check_out_dir", "check_out_file", "check_output_file", "check_output_dir", "check_int", "check_number",
    "check_columns", "parse_tau", "parse_retrieval_k", "parse_frozen_stages",
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


# ------------------------------------------------------------------------------------------ option fields
# Every option of ``autotl fit`` is a field of one of the dataclasses below, written once: its
# default, its command-line flag and help (``autotl.cli`` builds the command from them) and its check
# (the class's ``check``). ``fit()`` builds one ``FitOptions`` and checks it before any work starts.
_MISSING = dataclasses.MISSING
PANELS = ("", "Data", "Training", "Search", "Strategies")  # how the help groups the flags ("": with --help)


@dataclasses.dataclass(frozen=True)
class Flag:
    """How an option is given on the command line: ``decls`` (``"--trials", "-n"``; a boolean's
    ``"--ensemble/--no-ensemble"``), ``help``, ``panel`` (its heading in the help, ``PANELS``); ``value``: a flag that
    takes no value and sets this one when given (``--no-search``: ``search=False``); ``parse``: the
    command line's text to the value (``--frozen-stages N|all``)."""

    decls: tuple[str, ...]
    help: str
    panel: str
    value: Any = _MISSING
    parse: Callable[[str], Any] | None = None

    @property
    def name(self) -> str:
        """The long flag as messages name it (``--trials``; ``--ensemble`` of ``--ensemble/--no-ensemble``)."""
        return next(d for d in self.decls if d.startswith("--")).split("/")[0]


def option(default: Any = _MISSING, *decls: str, help: str = "", panel: str = "Strategies", factory: Any = _MISSING,
           param: bool = False, shapes_search: bool = False, value: Any = _MISSING,
           parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field of an options class: ``default`` (or ``factory``), the flag ``decls`` with its
    ``help`` (none: API only), ``param``: a trial parameter (recipes search it; its flag fixes it for
    every trial, ``fit(fixed_params=...)``), ``shapes_search``: refused with ``--no-search``."""
    flag = Flag(tuple(decls), help, panel, value, parse) if decls else None
    meta = {"flag": flag, "param": param, "shapes_search": shapes_search}
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def keyword_signature(cls: type, func: Callable) -> inspect.Signature:
    """``func``'s signature with its ``**options`` spelled out as the keyword parameters of the options
    dataclass ``cls``, their defaults and types as written there (what ``help()`` and editors show)."""
    params = [p for p in inspect.signature(func).parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not _MISSING else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=f.type))
    return inspect.signature(func).replace(parameters=params)


def flag_of(field: dataclasses.Field) -> Flag | None:
    return field.metadata.get("flag")


def flag_name(cls: type, name: str) -> str:
    """How messages name option ``name`` of ``cls``: its flag, else the name itself (an API-only option)."""
    field = cls.__dataclass_fields__.get(name)
    flag = flag_of(field) if field is not None else None
    return flag.name if flag is not None else name


def parse_frozen_stages(text: str) -> int | str:
    """``--frozen-stages`` as typed: ``all`` or a whole number (checked against the model later)."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise AutotlError(f"--frozen-stages {text!r}: give a number of stages or 'all'") from None


# ------------------------------------------------------------------------------------------ strategies
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


def parse_retrieval_k(value: Any, flag: str = "retrieval_k") -> int:
    """Neighbours K0 per target image: ``None``/``"none"``/``"off"`` → 0 (no retrieval), else a whole number >= 0."""
    if value in (None, "", "none", "off"):
        return 0
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise AutotlError(f"{flag} {value!r}: give a whole number >= 0 (0 = no retrieval)") from None
    return check_int(flag, value, minimum=0, what="a whole number (neighbours per target image; 0 = off)")


class StrategyOptions:
    """A strategy's options (a dataclass deriving this): its trial parameters (``option(param=True)``:
    the recipe's dimensions, the strategy's ``params``) and its run-wide options (``fit(options=...)``).
    ``of(options, params)`` is what one training reads: each parameter from the trial, else from the
    run-wide options, else its default."""

    @classmethod
    def params(cls) -> tuple[str, ...]:
        """The names of its trial parameters."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("param"))

    @classmethod
    def of(cls, options: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None):
        options, params = options or {}, params or {}
        values = {}
        for f in dataclasses.fields(cls):
            value = params.get(f.name) if f.metadata.get("param") else None
            if value is None or value == "":
                value = options.get(f.name)
            if value is not None and value != "":
                values[f.name] = value
        return cls(**values)

    def check(self, name: Callable[[str], str] = str) -> None:
        """Refuse a value no training could use (``name``: how messages name an option, by its name)."""

    @classmethod
    def check_given(cls, fixed: Mapping[str, Any], options: Mapping[str, Any], data_dir: Any = None) -> None:
        """``fit``'s check before any work starts: the values as given (``fixed``: fixed trial parameters),
        named by their flags."""
        cls.of(options, fixed).check(lambda name: flag_name(cls, name))


# L2 damping of the convex head's *mean* objective on features scaled to unit mean squared norm (see
# ``autotl.dropout.strategy._standardise``): the same value means the same thing for every backbone.
# On Lite0 features of cats_vs_dogs with 0/20/40 % flipped labels, l2 in [1e-3, 1e-1] all gave
# precision >= 0.95 at tau <= 1; 1e-2 dropped the fewest clean images and needs ~15 CG iterations.
DROPOUT_L2 = 1e-2
DROPOUT_MODES = ("spread", "fraction")
DROPOUT_INFLUENCES = ("head", "block")


@dataclasses.dataclass
class DropoutOptions(StrategyOptions):
    """Influence-based data dropout (``autotl.dropout.strategy.DataDropout``)."""

    dropout_tau: str | float | None = option(
        None, "--dropout-tau", param=True,
        help="Data dropout: drop training images whose predicted reduction of the val loss exceeds TAU robust spreads "
             "(0 = every harmful image, 'none' = off); fixes what the search would vary.")
    dropout_mode: str = option("spread", param=True)  # "spread": tau in robust spreads; "fraction": a share of the harmful
    dropout_influence: str = option("head", param=True)  # "head": convex head on frozen features; "block": + the last stage
    focus_class: str | None = option(
        None, "--focus-class", help="Data dropout: only this class's validation images are the influence reference.")
    dropout_l2: float = DROPOUT_L2
    dropout_min_keep: float = 0.1  # the class guard: each class keeps at least this share of its images
    dropout_solver: str = "auto"

    def check(self, name: Callable[[str], str] = str) -> None:
        try:
            tau = parse_tau(self.dropout_tau)
        except AutotlError as exc:
            raise AutotlError(name("dropout_tau") + str(exc)[len("dropout_tau"):]) from None
        check_choice(name("dropout_mode"), self.dropout_mode, DROPOUT_MODES)
        if self.dropout_mode == "fraction" and tau is not None and tau > 1:
            raise AutotlError(f"{name('dropout_tau')} {tau:g}: in mode 'fraction' tau is a share in [0, 1]")
        check_choice(name("dropout_influence"), str(self.dropout_influence).lower(), DROPOUT_INFLUENCES)
        if self.focus_class is not None:
            check_name(name("focus_class"), self.focus_class, "class name")
        check_number(name("dropout_l2"), self.dropout_l2, positive=True, hint=" (the convex head's L2 damping, e.g. 0.01)")
        x = check_number(name("dropout_min_keep"), self.dropout_min_keep)
        if not 0.0 <= x <= 1.0:
            raise AutotlError(f"{name('dropout_min_keep')} {x:g}: give a share from 0 to 1")

    @classmethod
    def check_given(cls, fixed: Mapping[str, Any], options: Mapping[str, Any], data_dir: Any = None) -> None:
        super().check_given(fixed, options, data_dir)
        if options.get("focus_class") is not None and fixed.get("dropout_tau") is not None \
                and parse_tau(fixed["dropout_tau"]) is None:
            raise AutotlError("--focus-class with --dropout-tau none: the focus class only changes data dropout, which is "
                              "off; give --dropout-tau 0 or more, or drop --focus-class")


RETRIEVAL_MODES = ("knn", "random")
SOURCE_HEAD_INITS = ("imagenet", "random")
SOURCE_WEIGHTS = ("auto", "datl", "uniform")


def _banks() -> Sequence[str]:
    from .retrieval.neighbours import BANKS  # the registered filter banks (torch): only when a bank is checked

    return BANKS


@dataclasses.dataclass
class RetrievalOptions(StrategyOptions):
    """Selective joint fine-tuning (``autotl.retrieval.strategy.SelectiveJointFineTuning``)."""

    source_pool: str | os.PathLike | None = option(
        None, "--source-pool",
        help="Selective joint fine-tuning: source images, one sub-folder per class (e.g. ImageNet wnid folders).")
    retrieval_k: int | None = option(None, "--retrieval-k", param=True,
                                     help="Source neighbours K0 per target image from --source-pool (0 = off).")
    retrieval_bank: str = option(
        "gabor", "--retrieval-bank", param=True,
        help="Filter bank for retrieval: gabor, conv, firstconvs (the first two convolutions after their activation) or "
             "gabor+conv.")
    source_loss_weight: float = option(1.0, "--source-loss-weight", param=True,
                                       help="Weight of the source task's loss (default 1).")
    # "imagenet": the source head starts from the source model's classifier rows of the pool's wnid classes
    source_head_init: str = option("imagenet", param=True)
    retrieval_rounds: int = 5  # hard-sample rounds (the paper's five; scaled down to the epoch budget)
    retrieval_mode: str = "knn"  # "random": the ablation (random pool images instead of neighbours)
    source_weights: str = "auto"  # auto: DATL w(y) when the run folder has them, else uniform; datl; uniform
    retrieval_cache_dir: str | os.PathLike | None = None  # descriptors (default: the feature cache's retrieval/)

    def check(self, name: Callable[[str], str] = str) -> None:
        parse_retrieval_k(self.retrieval_k, name("retrieval_k"))
        banks = _banks()
        bank = self.retrieval_bank
        if not isinstance(bank, str) or bank.lower() not in banks:
            raise AutotlError(f"{name('retrieval_bank')} {_shown(bank)}: use one of {', '.join(banks)}")
        check_number(name("source_loss_weight"), self.source_loss_weight, non_negative=True,
                     hint=" (the source task's loss weight, default 1)")
        check_choice(name("source_head_init"), str(self.source_head_init).lower(), SOURCE_HEAD_INITS)
        check_int(name("retrieval_rounds"), self.retrieval_rounds, minimum=1)
        check_choice(name("retrieval_mode"), str(self.retrieval_mode).lower(), RETRIEVAL_MODES)
        check_choice(name("source_weights"), str(self.source_weights).lower(), SOURCE_WEIGHTS)

    @classmethod
    def check_given(cls, fixed: Mapping[str, Any], options: Mapping[str, Any], data_dir: Any = None) -> None:
        pool = options.get("source_pool")
        if pool is not None and not (isinstance(pool, str) and not pool.strip()):
            p = _check_existing_dir("--source-pool", pool, "a folder with one sub-folder of images per source class")
            d = _real(data_dir) if data_dir is not None else None
            if d is not None and (_within(_real(p), d) or _real(p) in d.parents):
                raise AutotlError(f"--source-pool {p}: is the data folder {data_dir} or overlaps it; the pool's images would "
                                  "train beside the images that validate; give a folder of other images")
        elif pool is not None:
            raise AutotlError("--source-pool '': give a folder with one sub-folder of images per source class")
        super().check_given(fixed, options, data_dir)
        k = parse_retrieval_k(fixed["retrieval_k"], "--retrieval-k") if fixed.get("retrieval_k") is not None else None
        given = [flag_name(cls, n) for n in ("retrieval_k", "retrieval_bank", "source_loss_weight") if fixed.get(n) is not None]
        it = "it" if len(given) == 1 else "them"
        if not pool and given and not (given == ["--retrieval-k"] and k == 0):
            raise AutotlError(f"{', '.join(given)}: only selective joint fine-tuning uses {it}; give --source-pool DIR too "
                              f"(source images, one sub-folder per class), or drop {it}")
        if k == 0 and len(given) > 1:
            flags = [f for f in given if f != "--retrieval-k"]
            raise AutotlError(f"{', '.join(flags)} with --retrieval-k 0: retrieval is off, so "
                              f"{'it has' if len(flags) == 1 else 'they have'} no effect; give --retrieval-k 1 or more, "
                              "or drop them")


@dataclasses.dataclass
class FinetuneOptions(StrategyOptions):
    """LP-FT and WiSE-FT (``autotl.finetune.ProbeStartedFineTuning``)."""

    lp_init: bool = option(False, param=True)  # start the new head from the solved probe
    wise: bool = option(False, param=True)  # interpolate, alpha chosen on the validation images
    wise_alpha: float | None = option(None, param=True)  # a fixed alpha (what a refit reuses)
    probe_l2: float = 0.01  # the probe's penalty (a search sets the best probe trial's)


# How a probe trial picks its L2 penalty on the path. "logloss": the least out-of-fold log loss;
# "one_se": the strongest penalty within one standard error (over folds) of that least loss. On tiny
# separable sets the log-loss minimum sits at the weakest penalty; the one-SE rule leans to the
# strongest of the near-ties instead, as scikit-learn's probe takes the strongest C among tied scores.
PENALTY_RULES = ("logloss", "one_se")


@dataclasses.dataclass
class ProbeOptions(StrategyOptions):
    """How a linear probe trial is solved (``autotl.probe.ProbeFeatures``)."""

    penalty_rule: str = option(
        "logloss", "--penalty-rule", param=True,
        help="Probe trials: pick the L2 penalty by the least out-of-fold log loss (logloss) or the strongest within "
             "one standard error of it (one_se); fixes what the search would vary.")

    def check(self, name: Callable[[str], str] = str) -> None:
        check_choice(name("penalty_rule"), self.penalty_rule, PENALTY_RULES)


# every strategy's options, in the order of their flags in ``autotl fit --help``
STRATEGY_OPTIONS: tuple[type[StrategyOptions], ...] = (DropoutOptions, RetrievalOptions, FinetuneOptions, ProbeOptions)


# ------------------------------------------------------------------------------------------ fit and search
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


def check_columns(**columns: Any) -> None:
    """``--path-column`` / ``--label-column``: a column name of the label file, when given."""
    for name, value in columns.items():
        if value is not None:
            check_name("--" + name.replace("_", "-"), value, "column name of the label file's header")


@dataclasses.dataclass
class _SearchFields:
    """What a strategy search takes, from ``fit`` as from ``autotl.search.search``."""

    trials: int | None = option(None, "--trials", "-n", panel="Search", shapes_search=True,
                                help="Search: trials in the study in total (default: the recipe's).")
    time_budget: str | float | None = option(
        None, "--time-budget", panel="Search", shapes_search=True,
        help="Search: stop after this long (90s, 20m, 1h; whichever of trials/budget ends first; default: automatic "
             "from the data size unless --trials is given).")
    cv_folds: int = option(5, "--cv-folds", panel="Search",
                           help="Search: folds of the cross-validation that scores each trial (small data sets).")
    ensemble: bool = option(True, "--ensemble/--no-ensemble", panel="Search",
                            help="Search: publish a greedy ensemble of trials (one ONNX graph) when it beats the selected "
                                 "trial out of fold.")
    recipe: Any = option(  # a name, a .yaml file or an autotl.search.Recipe
        None, "--recipe", panel="Search", shapes_search=True,
        help="Search space: quick, default, thorough, retrieval (selective joint fine-tuning, with --source-pool) or a "
             ".yaml file (default: default).")
    resume: bool = option(False, "--resume", panel="Search", shapes_search=True,
                          help="Continue the interrupted study of --out (same data, recipe and models).")
    storage: str | None = option(None, "--storage", panel="Search", shapes_search=True,
                                 help="Optuna storage URL for the study (default sqlite:///OUT/study.db).")
    study: str | None = option(None, "--study", panel="Search", shapes_search=True,
                               help="Study name in the storage (default 'autotl').")
    top_k: int | None = option(None, "--top-k", panel="Search",
                               help="Search: candidate source models among --model (default: the recipe's or all).")
    # trial parameters fixed for every trial ({"dropout_tau": 3.0}; the strategies' ``param`` flags)
    fixed_params: Mapping[str, Any] | None = None
    # run-wide strategy options ({"source_pool": "pool/"}; see STRATEGY_OPTIONS)
    options: Mapping[str, Any] | None = None

    def _check_search(self) -> None:
        if self.trials is not None:
            check_int("--trials", self.trials, minimum=1)
        if self.time_budget is not None:
            from ._recipe import parse_duration

            if isinstance(self.time_budget, str) and not self.time_budget.strip():
                raise AutotlError("--time-budget '': give a duration like 90s, 20m, 1h or 1h30m")
            parse_duration(self.time_budget)  # AutotlError for garbage, <= 0, nan, inf
        if self.top_k is not None:
            check_int("--top-k", self.top_k, minimum=1, what="a number of candidate models")
        check_int("--cv-folds", self.cv_folds, minimum=2, what="a number of folds")
        if self.study is not None:
            check_name("--study", self.study, "study name")
        if self.storage is not None and (not isinstance(self.storage, str) or not self.storage.strip()):
            raise AutotlError(f"--storage {_shown(self.storage)}: give an Optuna storage URL (sqlite:///study.db, "
                              "postgresql://user@host/db) or leave it out for RUN_DIR/study.db")

    def _check_strategies(self, data_dir: Any = None) -> None:
        fixed, opts = dict(self.fixed_params or {}), dict(self.options or {})
        for cls in STRATEGY_OPTIONS:
            cls.check_given(fixed, opts, data_dir)


@dataclasses.dataclass
class SearchOptions(_SearchFields):
    """What ``autotl.search.plan_search`` / ``search`` take (``FitOptions.search_options`` makes one)."""

    cv_repeats: int | None = None  # repeats of the k-fold split (None: as the data size decides)
    objective_reason: str = ""  # why the objective is the one it is, for the log and the card

    def check(self) -> None:
        self._check_search()
        self._check_strategies()


@dataclasses.dataclass
class FitOptions(_SearchFields):
    """Everything ``autotl.fit`` takes besides the data and the run folder (``autotl fit``'s flags)."""

    models: Sequence[Any] = option((), "--model", "-m", panel="Data",  # names or ModelSpecs
                                   help="timm model NAME\\[@SIZE]\\[=CHECKPOINT|random]; repeatable.")
    zoo: str | None = option(
        None, "--models", panel="Data",
        help="Candidate source models: auto (the packaged ones + the hub zoo's for this device when cached or "
             "downloadable; the default without --model), packaged, hub or all; added to any --model.")
    path_column: str | None = option(
        None, "--path-column", panel="Data",
        help="Label file: the column of image paths (default: the header's path/file/filename/image column).")
    label_column: str | None = option(
        None, "--label-column", panel="Data",
        help="Label file: the column of labels (default: the header's label/class/category column).")
    val_fraction: float = option(0.1, "--val-fraction", panel="Data",
                                 help="Validation share per class when there is no val/ folder.")
    duplicates: str = option("warn", "--duplicates", panel="Data",
                             help="Byte-identical images across splits: warn (list them), drop (remove the val/test "
                                  "copies) or error.")
    seed: int = option(0, "--seed", panel="Data", help="Seed for the split, initialisation and data order.")
    device: str | None = option("auto", "--device", panel="Data", help="auto, cpu, cuda or cuda:N.")
    cache_dir: str | os.PathLike | None = option(None, "--cache-dir", panel="Data",
                                                 help="Feature cache folder (default ~/.cache/autotl/features).")
    frozen_stages: int | str = option(TrainConfig.frozen_stages, "--frozen-stages", panel="Training",
                                      parse=parse_frozen_stages,
                                      help="Stages to freeze: N, -N (all but N) or 'all' (linear probe).")
    epochs: int = option(TrainConfig.epochs, "--epochs", panel="Training",
                         help="Maximum epochs (early stopping on validation).")
    lr: float = option(TrainConfig.lr, "--lr", panel="Training", help="Head learning rate (pretrained stages get a tenth).")
    batch_size: int = option(TrainConfig.batch_size, "--batch-size", panel="Training", help="Mini-batch size.")
    objective: str | None = option(None, "--objective", panel="Training",
                                   help="accuracy or macro_f1 (default: macro_f1 when classes are imbalanced).")
    search: bool | None = option(
        None, "--no-search", panel="Training", value=False,
        help="Train only the one strategy the flags describe (a linear probe by default), early-stopped on val; no search.")
    overwrite: bool = option(False, "--overwrite", panel="",
                             help="Replace the run in --out (kept until the new one is published, put back if it fails; "
                                  "your own files there stay).")
    quantize: str | None = option(
        None, "--quantize", panel="",
        help="Also write model.int8.onnx (int8: static QDQ, calibrated on training images), kept only within 0.5 accuracy "
             "points of fp32 on images the model did not train on (val; after a search: test, else augmented views).")
    config: TrainConfig | None = None  # every training setting at once (its objective unless --objective is given)

    @property
    def searching(self) -> bool:
        return self.search is not False

    def search_options(self, **changes: Any) -> SearchOptions:
        """The search part of these options (``changes``: e.g. the loaded recipe, the automatic budget)."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(_SearchFields)}
        return SearchOptions(**{**shared, **changes})

    def check(self, data_dir: Any, out: Any = None) -> None:
        """Every option that can be checked without reading the data or loading a model."""
        if data_dir is None or (isinstance(data_dir, str) and not data_dir.strip()):
            raise AutotlError("DATA_DIR: give the folder of images (one sub-folder per class, or train/ val/ [test/]) "
                              "or a label file (CSV of image paths and labels)")
        check_columns(path_column=self.path_column, label_column=self.label_column)
        if self.zoo is not None:
            from .zoo import ZOO_CHOICES

            check_choice("--models", self.zoo, ZOO_CHOICES)
        self._check_training()
        check_fraction("--val-fraction", self.val_fraction, "validation share")
        check_seed("--seed", self.seed)
        check_device("--device", self.device)
        _check_cache_dir(self.cache_dir)
        check_quantize(self.quantize)
        from .duplicates import DUPLICATE_MODES

        if self.duplicates not in DUPLICATE_MODES:
            raise AutotlError(f"--duplicates {self.duplicates!r}: use one of {', '.join(DUPLICATE_MODES)} (e.g. drop)")
        if self.models:
            if isinstance(self.models, str):
                raise AutotlError(f"models={self.models!r}: give a list of model names (e.g. [{self.models!r}])")
            for m in self.models:
                if isinstance(m, str) and not m.strip():
                    raise AutotlError("--model '': give a timm model name (NAME, NAME@SIZE, NAME=CHECKPOINT or NAME=random)")
        self._check_search()
        if self.recipe is not None and self.searching:
            from ._recipe import load_recipe

            load_recipe(self.recipe)  # a typo in the name or the file is reported now, not after the scoring pass
        if self.resume and self.overwrite:
            raise AutotlError("--resume with --overwrite: --resume continues the search in --out, --overwrite replaces "
                              "the run there; give one of them")
        given = [flag_of(f).name for f in dataclasses.fields(self)
                 if f.metadata.get("shapes_search") and getattr(self, f.name) not in (None, False)]
        if self.search is False and given:
            raise AutotlError(f"--no-search with {', '.join(given)}: those shape a search; drop --no-search to search, "
                              "or drop them to train one strategy")
        self._check_strategies(data_dir)
        check_out_dir("--out", out if out is not None else "runs")

    def _check_training(self) -> None:
        """The training values (the flags, or a ``TrainConfig`` passed as ``config``)."""
        cfg = self.config if self.config is not None else self
        check_int("--epochs", cfg.epochs, minimum=1)
        check_int("--batch-size", cfg.batch_size, minimum=1)
        check_number("--lr", cfg.lr, positive=True, hint=" (the head's learning rate, e.g. 3e-3)")
        _check_frozen_value(cfg.frozen_stages)
        objective = self.objective if self.objective is not None else cfg.objective
        if objective is not None:
            check_choice("--objective", objective, OBJECTIVES)


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


def check_dropout_options(*, tau: Any, mode: Any, focus_class: Any, out: Any, l2: Any, min_keep_fraction: Any,
                          val_fraction: Any, seed: Any, device: Any, cache_dir: Any, top: Any, write_clean: Any,
                          path_column: Any, label_column: Any, data_dir: Any, **_other: Any) -> None:
    """``inspect_dropout``'s arguments: the dropout values as ``DropoutOptions`` checks them, named by the
    dry run's flags."""
    check_columns(path_column=path_column, label_column=label_column)
    names = {"dropout_tau": "--tau", "dropout_mode": "--mode", "dropout_l2": "--l2", "dropout_min_keep": "min_keep_fraction"}
    DropoutOptions(dropout_tau=tau, dropout_mode=mode, focus_class=focus_class, dropout_l2=l2,
                   dropout_min_keep=min_keep_fraction).check(lambda name: names.get(name, flag_name(DropoutOptions, name)))
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
