"""The ``autotl`` command line: a thin typer layer over the Python API.

The only module that imports typer. Each command calls one API function and prints its result;
``AutotlError`` from the API becomes one line on stderr and exit code 2 (``main``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import json
import os
import sys
import typing
from importlib import import_module
from pathlib import Path
from typing import Any, List, Optional

import typer
import typer.core

from . import _console
from ._version import __version__
from .errors import AutotlError
from .score import RULES as SCORE_RULES  # numpy only; the help lists the rules

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Turn a folder of images into a deployable classifier by searching how to transfer.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"autotl {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit.")) -> None:
    pass


def _emit(obj, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
        sys.stdout.flush()


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: None means "not given", so the API function's own default applies."""
    return {k: v for k, v in options.items() if v is not None}


def _api_default(api: str, name: str) -> Any:
    """The default of parameter ``name`` of the API function ``api`` ("module:function"), else None."""
    module, attr = api.split(":")
    param = inspect.signature(getattr(import_module(module), attr)).parameters.get(name)
    return None if param is None or param.default is inspect.Parameter.empty else param.default


def _defaults_from(api: str) -> type[typer.core.TyperCommand]:
    """A command class whose --help shows, for each option declared ``None`` (= not given, see
    ``_given``), the default of the same-named parameter of ``api``: CLI defaults are the API's,
    defined once, and the API module (torch, for some) is imported only when help is shown."""

    class ApiDefaultsCommand(typer.core.TyperCommand):
        def format_help(self, ctx, formatter) -> None:
            saved = {}
            for param in self.params:
                declared_none = isinstance(param, typer.core.TyperOption) and param.default is None
                default = _api_default(api, param.name) if declared_none else None
                if default is not None:
                    saved[param] = (param.default, param.show_default)
                    param.default, param.show_default = default, True
            try:
                super().format_help(ctx, formatter)
            finally:  # only the help shows them: parsing keeps None = "not given"
                for param, (default, show) in saved.items():
                    param.default, param.show_default = default, show

    return ApiDefaultsCommand


# ------------------------------------------------------------------------------------------ fit
# `autotl fit` is built from the option classes (``autotl.options``: ``FitOptions`` and each strategy's
# class): every field with a flag is one option here, with the field's default, help and check, so a
# new option or searched dimension is written once, where its strategy's options are.
_MISSING = dataclasses.MISSING


def _fit_fields() -> list[tuple[type, dataclasses.Field]]:
    """(class, field) of every option with a flag: ``FitOptions``'s, then each strategy's."""
    from .options import STRATEGY_OPTIONS, FitOptions, flag_of

    fields = [(cls, f) for cls in (FitOptions, *STRATEGY_OPTIONS) for f in dataclasses.fields(cls) if flag_of(f)]
    names = [f.name for _, f in fields]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two options of autotl fit share a name: {sorted(n for n in names if names.count(n) > 1)}")
    return fields


def _cli_default(field: dataclasses.Field) -> Any:
    """What the command line holds when the flag is not given: the field's default; None for a trial
    parameter (not given = the search varies it); False for a flag without a value."""
    from .options import flag_of

    if flag_of(field).value is not _MISSING:
        return False
    if field.metadata.get("param"):
        return None
    default = field.default_factory() if field.default_factory is not _MISSING else field.default
    return list(default) if isinstance(default, tuple) else default


def _cli_type(cls: type, field: dataclasses.Field) -> Any:
    """The command line's type of an option, from the field's annotation."""
    from .options import flag_of

    flag = flag_of(field)
    if flag.value is not _MISSING:
        return bool
    hint = typing.get_type_hints(cls)[field.name]
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence):
        return List[str]
    kinds = [a for a in (typing.get_args(hint) or (hint,)) if a is not type(None)]
    if flag.parse is not None:
        kind = str  # the text, parsed by the flag
    elif os.PathLike in kinds:
        kind = Path
    elif len(kinds) == 1 and kinds[0] in (bool, int, float, str):
        kind = kinds[0]
    else:
        kind = str
    return Optional[kind] if _cli_default(field) is None else kind


def _fit_parameters(head: list[inspect.Parameter], tail: list[inspect.Parameter]) -> list[inspect.Parameter]:
    """The fit command's parameters: ``head`` (the data, the run folder), then every option and ``tail``
    grouped by their help panel."""
    from .options import PANELS, flag_of

    made = []
    for cls, field in _fit_fields():
        flag = flag_of(field)
        info = typer.Option(_cli_default(field), *flag.decls, help=flag.help, rich_help_panel=flag.panel or None)
        made.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                                      annotation=_cli_type(cls, field)))
    made += tail
    return head + sorted(made, key=lambda p: PANELS.index(p.default.rich_help_panel or ""))


def _fit_options(values: dict[str, Any]) -> dict[str, Any]:
    """``autotl.fit``'s keyword arguments from the command line's values: ``FitOptions``'s fields, and
    each strategy's flags as fixed trial parameters (``param``) or run-wide options."""
    from .options import FitOptions, flag_of

    kwargs: dict[str, Any] = {}
    fixed: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for cls, field in _fit_fields():
        flag, value = flag_of(field), values[field.name]
        if cls is FitOptions:
            if flag.value is not _MISSING:
                value = flag.value if value else field.default
            elif flag.parse is not None:
                value = flag.parse(value)
            kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        elif field.metadata.get("param"):
            if value is not None:
                fixed[field.name] = value
        elif value:  # a run-wide option (a path as text: the study keeps it for its workers)
            options[field.name] = os.fspath(value) if isinstance(value, os.PathLike) else value
    return {**kwargs, "fixed_params": fixed or None, "options": options or None}


def fit(**values: Any) -> None:
    """Fit a classifier on DATA_DIR (a folder or a CSV of paths and labels) and export a verified ONNX model.

    `autotl fit DIR` ranks the candidate source models, searches how to transfer under an automatic
    time budget (each trial cross-validated on images that decided nothing about it), refits the
    winner on all labelled images and exports it. `--no-search` trains one strategy from the flags.
    """
    from .fit import fit as fit_api
    from .search import SearchInterrupted

    as_json, data_dir = values["as_json"], values["data_dir"]
    _console.set_quiet(as_json)
    if values["dry_run_dropout"]:
        from .dropout.dryrun import inspect_dropout

        _dry_run_alone(values)
        ins = inspect_dropout(data_dir, focus_class=values["focus_class"], out=values["out"],
                              val_fraction=values["val_fraction"], seed=values["seed"], device=values["device"],
                              cache_dir=values["cache_dir"], show=not as_json, path_column=values["path_column"],
                              label_column=values["label_column"],
                              **_given(model=values["models"][0] if values["models"] else None, tau=values["dropout_tau"]))
        _emit(ins.to_json(), as_json)
        return
    try:
        result = fit_api(data_dir, values["out"], **_fit_options(values))
    except SearchInterrupted as exc:
        if getattr(exc, "restored_earlier_run", False):  # --overwrite: nothing new to resume
            _emit({"interrupted": True, "run_dir": str(exc.run_dir), "restored_earlier_run": True, "resume": None}, as_json)
            sys.stderr.write(_console.clean_text(f"interrupted: the earlier run in {exc.run_dir} is back in place; the new "
                                                 "search was discarded") + "\n")
            raise typer.Exit(130) from None
        command = _resume_command(exc.run_dir, data_dir, values)
        _emit({"interrupted": True, "run_dir": str(exc.run_dir), "study_name": exc.study_name, "storage": exc.storage,
               "finished_trials": exc.finished, "resume": command}, as_json)
        sys.stderr.write(_console.clean_text(f"interrupted: {exc.finished} trial(s) finished, the running one marked failed; "
                                             f"resume with: {command}") + "\n")
        raise typer.Exit(130) from None
    _emit(result.to_json(), as_json)


fit.__signature__ = inspect.Signature(_fit_parameters(
    [inspect.Parameter("data_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path, default=typer.Argument(
        ..., help="Folder with one sub-folder per class, or train/ val/ \\[test/], or a label file (.csv/.tsv: image "
                  "path, label \\[, split] per row).")),
     inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
         None, "--out", "-o", help="Run folder (default runs/<data>-<time>)."))],
    [inspect.Parameter("dry_run_dropout", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
         False, "--dry-run-dropout", rich_help_panel="Strategies",
         help="Only score the training images and write dropped.csv (as `autotl dropout`); no training.")),
     inspect.Parameter("as_json", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
         False, "--json", help="Print one JSON document on stdout."))]))
app.command()(fit)

_DRY_RUN_USES = {"data_dir", "out", "models", "dropout_tau", "focus_class", "val_fraction", "seed", "device", "cache_dir",
                 "dry_run_dropout", "as_json", "path_column", "label_column"}


def _dry_run_alone(values: dict[str, Any]) -> None:
    """``fit --dry-run-dropout`` only scores the training images: refuse the flags it would ignore."""
    ignored = []
    for name, param in inspect.signature(fit).parameters.items():
        info = param.default
        if name in _DRY_RUN_USES or not isinstance(info, typer.models.OptionInfo) or name not in values:
            continue
        if values[name] != info.default:
            ignored.append(next((d for d in info.param_decls if d.startswith("--")), "--" + name.replace("_", "-")))
    if len(values.get("models") or []) > 1:
        ignored.insert(0, "a second --model")
    if ignored:
        raise AutotlError(f"--dry-run-dropout with {', '.join(ignored)}: the dry run only scores the training images with "
                          "one --model (and --dropout-tau, --focus-class, --out, --val-fraction, --seed, --device); drop "
                          "the others, or drop --dry-run-dropout to fit")


# what a resumed search must not repeat: the data and folder are given, and these say what to do with the folder
_NOT_RESUMED = {"data_dir", "out", "resume", "overwrite", "search", "dry_run_dropout", "as_json"}


def _resume_command(run_dir: Path, data_dir: Path, values: dict[str, Any]) -> str:
    """The command line that resumes this search: its data, run folder and options + --resume.

    An option at the fit command's own default is left out (so the line stays short and can never
    disagree with those defaults); ``values`` are the interrupted command's, by parameter name."""
    import shlex

    args = ["fit", str(data_dir), "--out", str(run_dir)]
    for name, param in inspect.signature(fit).parameters.items():
        info = param.default
        if name in _NOT_RESUMED or name not in values or not isinstance(info, typer.models.OptionInfo):
            continue
        value = values[name]
        if value is None or value == info.default:
            continue
        flag = next(d for d in info.param_decls if d.startswith("--"))
        if isinstance(value, bool):
            on, _, off = flag.partition("/")
            args.append(on if value else off)
        else:
            for v in value if isinstance(value, (list, tuple)) else [value]:
                args += [flag, str(v)]
    return "autotl " + shlex.join(args + ["--resume"])


TABLE_ROWS = 50  # predictions shown in the console table (the CSV / --json have all)


@app.command(cls=_defaults_from("autotl.predict:predict"))
def predict(
    model_path: Path = typer.Argument(..., help="model.onnx or model.int8.onnx written by `autotl fit` (model.json beside it)."),
    paths: List[Path] = typer.Argument(..., help="Image files, folders, or label files (.csv/.tsv) with a path column."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="Labels to show per image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write a CSV file (row by row as images are classified)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per onnxruntime call."),
    path_column: Optional[str] = typer.Option(None, "--path-column", help="Label files: the column of image paths (default: the header's path/file/filename/image column)."),
) -> None:
    """Classify images with an exported model, model.onnx or model.int8.onnx (onnxruntime only; no torch)."""
    from .predict import predict as predict_api

    _console.set_quiet(as_json)
    # checked before the model loads (--csv never replaces the model, its card or an image); streamed:
    # the CSV is written as it goes; the table holds only its first rows (--json needs all)
    result = predict_api(model_path, paths, top_k=top_k, csv=csv, keep=None if as_json else TABLE_ROWS,
                         path_column=path_column, **_given(batch_size=batch_size))
    if not as_json:
        _console.console.print(result.table(max_rows=TABLE_ROWS))
    if not result.predictions and result.errors:  # nothing classified: a failure, not an empty success
        first = result.errors[0]
        more = f" (and {len(result.errors) - 1} more)" if len(result.errors) > 1 else ""
        raise AutotlError(f"none of the {len(result.errors)} image(s) could be read: {first['path']}: {first['reason']}{more}; "
                          "pass readable image files (JPEG, PNG, BMP, WebP, TIFF)")
    _emit(result.to_json(), as_json)


@app.command(cls=_defaults_from("autotl.quantize:quantize_run"))
def export(
    run: Path = typer.Argument(..., help="A finished run folder (the --out of `autotl fit`)."),
    quantize: str = typer.Option(..., "--quantize", help="int8: write model.int8.onnx (static QDQ, calibrated on the run's training images), kept only within 0.5 accuracy points of fp32 on images the model did not train on (val; after a search: test, else augmented views)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The run's data folder or label file, if it moved (default: the one the fit read)."),
    val_fraction: Optional[float] = typer.Option(None, help="The fit's --val-fraction (when its data had no val/ folder)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Add an int8 model to an existing run (the card gets both models' size, latency and accuracy)."""
    from .quantize import quantize_run

    _console.set_quiet(as_json)
    report = quantize_run(run, quantize=quantize, data_dir=data, **_given(val_fraction=val_fraction))
    _emit(report.to_json(), as_json)


@app.command()
def info(
    run: Optional[Path] = typer.Argument(None, help="A run folder or model.onnx: show its model card."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show the environment (versions, device, offline weights, cache) or a model card, its estimate for new images first."""
    headline = None
    if run is not None:
        from .card import load_run_card

        card = load_run_card(run)
        doc, headline = card.to_json(), card.headline()
        doc = {"estimate": doc.pop("estimate"), **doc}  # the headline first
    else:
        import onnxruntime
        import timm
        import torch

        from .run import default_cache_dir
        from .models import cached_hub_file, list_packaged_models
        from .zoo import HUB_ZOO, hub_offline

        doc = {
            "autotl": __version__, "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "packaged_models": list_packaged_models(), "cache_dir": str(default_cache_dir()),
            "hub_zoo": [{"name": m.name, "tier": m.tier, "cached": cached_hub_file(m.name) is not None} for m in HUB_ZOO],
            "hub_offline": hub_offline() or False,
        }
    if as_json:
        _emit(doc, True)
    else:
        from rich.pretty import Pretty

        if headline:
            _console.console.print(headline, markup=False, highlight=False, soft_wrap=True)
        _console.console.print(Pretty(doc))


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/demo)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Generate a small image set, search how to transfer on it for 45 s, export; offline (a smoke test of the install)."""
    from .demo import demo as demo_api

    _console.set_quiet(as_json)
    result = demo_api(out)
    _emit(result.to_json(), as_json)


@app.command(cls=_defaults_from("autotl.worker:join_study"))
def worker(
    storage: str = typer.Option(..., "--storage", help="The study's Optuna storage URL (postgresql://user@host/db, ...)."),
    study: str = typer.Option(..., "--study", help="Study name (created by `autotl fit DIR --storage URL --study NAME`)."),
    data_dir: Optional[Path] = typer.Option(None, "--data", help="The data folder on this host (default: the path stored in the study)."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Stop after this many trials of this worker (default: until the study has its target)."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Shared artefact folder (default: the fit's RUN_DIR/artifacts, stored in the study)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Local scratch folder of this worker (default: a temp folder)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    heartbeat: Optional[int] = typer.Option(None, "--heartbeat", help="Heartbeat interval in seconds (env AUTOTL_HEARTBEAT_INTERVAL, default 60)."),
    grace: Optional[int] = typer.Option(None, "--grace", help="Seconds without heartbeat before a running trial is failed and retried (env AUTOTL_GRACE_PERIOD, default 2 x heartbeat)."),
    max_retry: Optional[int] = typer.Option(None, "--max-retry", help="Retries of a trial whose worker died (env AUTOTL_MAX_RETRY, default 3)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Join a search study in a shared storage and run its trials until it reaches its target."""
    from .worker import join_study

    _console.set_quiet(as_json)
    result = join_study(storage, study, data_dir=data_dir, trials=trials, artifacts=artifacts, out=out,
                        cache_dir=cache_dir, heartbeat=heartbeat, grace=grace, max_retry=max_retry,
                        **_given(device=device))
    _emit(result.to_json(), as_json)


@app.command(cls=_defaults_from("autotl.dropout.dryrun:inspect_dropout"))
def dropout(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ and val/ (and an optional test/), or a label file (.csv/.tsv)."),
    tau: Optional[str] = typer.Option(None, "--tau", help="Drop images scoring above TAU robust spreads (0 = every image predicted "
                                                          "to hurt, the paper's rule); 'none' only scores. With --mode fraction: "
                                                          "share of harmful images."),
    mode: Optional[str] = typer.Option(None, "--mode", help="spread (tau in robust-spread units) or fraction (tau = share of the harmful images)."),
    focus_class: Optional[str] = typer.Option(None, "--focus-class", help="Use only this class's validation images as the reference."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="timm model that scores the images: NAME, NAME@SIZE, NAME=CHECKPOINT or NAME=random."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for dropped.csv, influence.csv, dropped.jpg (default runs/<data>-dropout-<time>)."),
    top: Optional[int] = typer.Option(None, "--top", help="Most harmful images to show."),
    write_clean: Optional[Path] = typer.Option(None, "--write-clean", help="Write a cleaned copy (train/ without the dropped images, val/, test/) to this new folder."),
    copy: bool = typer.Option(False, "--copy", help="With --write-clean: copy the files instead of hard-linking them."),
    l2: Optional[float] = typer.Option(None, "--l2", help="L2 damping of the convex head (features scaled to unit mean squared norm)."),
    val_fraction: Optional[float] = typer.Option(None, help="Validation share per class when there is no val/ folder."),
    seed: Optional[int] = typer.Option(None, help="Seed for the validation split."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    path_column: Optional[str] = typer.Option(None, "--path-column", help="Label file: the column of image paths."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label file: the column of labels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show (and optionally remove) the training images predicted to hurt validation loss, without training."""
    from .dropout.dryrun import inspect_dropout

    _console.set_quiet(as_json)
    result = inspect_dropout(data_dir, focus_class=focus_class, out=out, cache_dir=cache_dir, write_clean=write_clean,
                             link=not copy, show=not as_json, path_column=path_column, label_column=label_column,
                             **_given(model=model, tau=tau, mode=mode, l2=l2, val_fraction=val_fraction, seed=seed,
                                      device=device, top=top))
    _emit(result.to_json(), as_json)


@app.command(cls=_defaults_from("autotl.report:write_report"))
def report(
    run_dir: Path = typer.Argument(..., help="Run folder written by `autotl fit` (its --out)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file to write (default RUN_DIR/report.html)."),
    plots: Optional[str] = typer.Option(None, "--plots", help="auto (plotly when installed, else SVG), plotly or svg (small, no script)."),
    open_browser: bool = typer.Option(False, "--open", help="Open the report in the default browser."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Write RUN_DIR/report.html: one self-contained page with the data, source-model ranking, search,
    evaluation, dropped images, retrieved neighbours and ONNX parity of a run."""
    from .report import write_report

    _console.set_quiet(as_json)
    path = write_report(run_dir, out, **_given(plots=plots))
    if as_json:
        _emit({"report": str(path)}, True)
    else:
        from rich.markup import escape

        _console.log(escape(f"wrote {path}"))
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@app.command(cls=_defaults_from("autotl.score:score"))
def score(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ val/ \\[test/], or a label file (.csv/.tsv)."),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="Candidate timm model NAME\\[@SIZE]\\[+reinitK]\\[=CHECKPOINT|random]; repeatable "
                                         "(default: every model with packaged weights)."),
    rule: Optional[str] = typer.Option(None, "--rule", help=f"Ranking rule: {', '.join(SCORE_RULES)}."),
    prior: List[str] = typer.Option([], "--prior",
                                    help="Source class-count file (CSV 'class,count' or JSON) as MODEL=FILE, or FILE "
                                         "for every model; ImageNet-1k heads default to a uniform prior."),
    top: Optional[int] = typer.Option(None, "--top", help="Source classes shown per model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Folder for scoring.json and datl/<model>.npz (default runs/<data>-score-<time>)."),
    val_fraction: Optional[float] = typer.Option(None, help="Validation share per class when there is no val/ folder (as fit)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the train/val split (as fit)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    path_column: Optional[str] = typer.Option(None, "--path-column", help="Label file: the column of image paths."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="Label file: the column of labels."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Rank candidate source models on DATA_DIR by DATL weights, LogME, LEEP and H-score (train split only)."""
    from .score import default_score_dir, parse_priors, score as score_api

    _console.set_quiet(as_json)
    out = out if out is not None else default_score_dir(data_dir)
    ranked = score_api(data_dir, model, out=out, prior_files=parse_priors(prior), cache_dir=cache_dir,
                       path_column=path_column, label_column=label_column,
                       **_given(rule=rule, top=top, val_fraction=val_fraction, seed=seed, device=device))
    if as_json:
        _emit({**ranked.to_json(), "run_dir": str(out)}, True)
        return
    console = _console.console
    width = console.width
    if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
        console.width = max(width, 150)
    try:
        console.print(ranked.table())
        for line in ranked.looks_like_lines(**_given(k=top)):
            console.print(line, markup=False)
    finally:
        console.width = width
    console.print(f"best: {ranked.ranking()[0]}; saved {out / 'scoring.json'} and {out / 'datl'}/", markup=False)


def _click_exceptions() -> dict[str, tuple[type, ...]]:
    """The exception classes of the click that this typer uses: its own copy (``typer._click``, typer
    0.2x) and/or the ``click`` package (older typer); each kind as a tuple of both where present."""
    modules = []
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            modules.append(import_module(name))
        except ImportError:
            pass
    kinds: dict[str, tuple[type, ...]] = {}
    for kind in ("ClickException", "UsageError", "NoArgsIsHelpError", "Abort", "Exit"):
        kinds[kind] = tuple(getattr(m, kind) for m in modules if isinstance(getattr(m, kind, None), type))
    kinds["Exit"] += (typer.Exit,)
    kinds["Abort"] += (typer.Abort,)
    return kinds


def _usage_line(exc: Exception) -> str:
    """A click usage error as one line: its message and where the help is (no usage block, no traceback)."""
    try:
        message = exc.format_message()
    except Exception:  # noqa: BLE001 - a message is all we need
        message = str(exc)
    ctx = getattr(exc, "ctx", None)
    where = f"; see `{ctx.command_path} --help`" if ctx is not None and getattr(ctx, "command_path", None) else ""
    message = " ".join(str(message).split())
    return _console.clean_text(f"{message.rstrip('.')}{where}" if where else message)


def _wants_json(argv: list[str]) -> bool:
    """``--json`` among the options (not after ``--``)."""
    args = list(argv)
    return "--json" in (args[:args.index("--")] if "--" in args else args)


def _error(message: str, code: int, as_json: bool) -> int:
    """One line on stderr; with ``--json`` also one JSON document on stdout (nothing else went there)."""
    sys.stderr.write(f"error: {message}\n")
    if as_json:
        _emit({"error": message, "exit_code": code}, True)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2 (usage errors: 2; no traceback);
    with ``--json`` the error is also one JSON document on stdout (``error``, ``exit_code``)."""
    kinds = _click_exceptions()
    as_json = _wants_json(sys.argv[1:] if argv is None else argv)
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int):  # click returns typer.Exit's code when standalone_mode is off
            return rc
    except AutotlError as exc:
        return _error(_console.clean_text(exc), 2, as_json)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as exc:  # click's own: usage errors, help shown for a bare `autotl`, Exit, Abort
        if kinds["NoArgsIsHelpError"] and isinstance(exc, kinds["NoArgsIsHelpError"]):
            exc.show()  # the help, as typer prints it for a bare `autotl` (exit code 2, like click 8.2)
            return int(getattr(exc, "exit_code", 2))
        if isinstance(exc, kinds["Exit"]):
            return int(getattr(exc, "exit_code", 0) or 0)
        if isinstance(exc, kinds["Abort"]):
            sys.stderr.write("aborted\n")
            return 130
        if isinstance(exc, kinds["ClickException"]):
            code = getattr(exc, "exit_code", 2)
            code = 2 if isinstance(exc, kinds["UsageError"]) or not isinstance(code, int) or code == 1 else code
            return _error(_usage_line(exc), code, as_json)
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
