"""The ``autotl`` command line: a thin typer layer over the Python API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import _console
from ._version import __version__
from .errors import AutotlError
from .dropout.cli import dropout_command  # typer+rich only; torch loads when it runs
from .report import report_command
from .score import score_command
from .worker import worker_command

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


def _frozen(value: str) -> int | str:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise AutotlError(f"--frozen-stages {value!r}: give a number of stages or 'all'") from None


@app.command()
def fit(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ val/ [test/]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<data>-<time>)."),
    model: List[str] = typer.Option([], "--model", "-m", help="timm model NAME[@SIZE][=CHECKPOINT|random]; repeatable."),
    frozen_stages: str = typer.Option("all", "--frozen-stages", help="Stages to freeze: N, -N (all but N) or 'all' (linear probe)."),
    epochs: int = typer.Option(15, help="Maximum epochs (early stopping on validation)."),
    lr: float = typer.Option(3e-3, help="Head learning rate (pretrained stages get a tenth)."),
    batch_size: int = typer.Option(64, help="Mini-batch size."),
    objective: Optional[str] = typer.Option(None, help="accuracy or macro_f1 (default: macro_f1 when classes are imbalanced)."),
    val_fraction: float = typer.Option(0.1, help="Validation share per class when there is no val/ folder."),
    seed: int = typer.Option(0, help="Seed for the split, initialisation and data order."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Search: trials in the study in total (default: the recipe's). "
                                         "Without --trials/--recipe/--resume, one strategy is trained from the flags above."),
    time_budget: Optional[str] = typer.Option(None, "--time-budget", help="Search: stop after this long (90s, 20m, 1h; whichever of trials/budget ends first)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Search space: quick, default, thorough or a .yaml file (default: default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the interrupted study of --out (same data, recipe and models)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL for the study (default sqlite:///OUT/study.db)."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name in the storage (default 'autotl')."),
    refit_on_val: bool = typer.Option(False, "--refit-on-val", help="Refit the best strategy on train+val (for its best epoch count)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Search: candidate source models among --model (default: the recipe's or all)."),
    dropout_tau: Optional[str] = typer.Option(None, "--dropout-tau", help="Data dropout: drop training images whose predicted reduction of the val loss exceeds TAU robust spreads (0 = every harmful image, 'none' = off); fixes what the search would vary."),
    focus_class: Optional[str] = typer.Option(None, "--focus-class", help="Data dropout: only this class's validation images are the influence reference."),
    dry_run_dropout: bool = typer.Option(False, "--dry-run-dropout", help="Only score the training images and write dropped.csv (as `autotl dropout`); no training."),
    source_pool: Optional[Path] = typer.Option(None, "--source-pool", help="Selective joint fine-tuning: source images, one sub-folder per class (e.g. ImageNet wnid folders)."),
    retrieval_k: Optional[int] = typer.Option(None, "--retrieval-k", help="Source neighbours K0 per target image from --source-pool (0 = off)."),
    retrieval_bank: Optional[str] = typer.Option(None, "--retrieval-bank", help="Filter bank for retrieval: gabor, conv or gabor+conv."),
    source_loss_weight: Optional[float] = typer.Option(None, "--source-loss-weight", help="Weight of the source task's loss (default 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Fit a classifier on DATA_DIR and export a verified ONNX model.

    Plain `autotl fit DIR` trains one strategy (a linear probe unless --frozen-stages says
    otherwise). `--trials N`, `--recipe NAME` or `--resume` search how to transfer instead.
    """
    from .fit import fit as fit_api
    from .search import SearchInterrupted

    _console.set_quiet(as_json)
    if dry_run_dropout:
        from .dropout.dryrun import DEFAULT_INSPECT_TAU, inspect_dropout

        ins = inspect_dropout(data_dir, model=model[0] if model else "tf_efficientnet_lite0",
                              tau=DEFAULT_INSPECT_TAU if dropout_tau is None else dropout_tau, focus_class=focus_class,
                              out=out, val_fraction=val_fraction, seed=seed, device=device, cache_dir=cache_dir, show=not as_json)
        _emit(ins.to_json(), as_json)
        return
    strategy = {k: v for k, v in {"dropout_tau": dropout_tau, "retrieval_k": retrieval_k, "retrieval_bank": retrieval_bank,
                                  "source_loss_weight": source_loss_weight}.items() if v is not None}
    options = {k: v for k, v in {"focus_class": focus_class, "source_pool": str(source_pool) if source_pool else None}.items() if v}
    try:
        result = fit_api(data_dir, out, models=model, strategy=strategy or None, options=options or None, frozen_stages=_frozen(frozen_stages), epochs=epochs, lr=lr,
                         batch_size=batch_size, objective=objective, val_fraction=val_fraction, seed=seed, device=device,
                         cache_dir=cache_dir, trials=trials, time_budget=time_budget, recipe=recipe, resume=resume,
                         storage=storage, study=study, refit_on_val=refit_on_val, top_k=top_k)
    except SearchInterrupted as exc:
        command = _resume_command(exc.run_dir, data_dir, {
            "--model": model, "--trials": trials, "--time-budget": time_budget, "--recipe": recipe, "--storage": storage,
            "--study": study, "--top-k": top_k, "--refit-on-val": refit_on_val, "--objective": objective,
            "--seed": seed if seed != 0 else None, "--val-fraction": val_fraction if val_fraction != 0.1 else None,
            "--cache-dir": cache_dir, "--device": device if device != "auto" else None,
            "--batch-size": batch_size if batch_size != 64 else None,
            "--frozen-stages": frozen_stages if frozen_stages != "all" else None, "--epochs": epochs if epochs != 15 else None,
            "--lr": lr if lr != 3e-3 else None, "--dropout-tau": dropout_tau, "--focus-class": focus_class,
            "--source-pool": source_pool, "--retrieval-k": retrieval_k, "--retrieval-bank": retrieval_bank,
            "--source-loss-weight": source_loss_weight})
        _emit({"interrupted": True, "run_dir": str(exc.run_dir), "study_name": exc.study_name, "storage": exc.storage,
               "finished_trials": exc.finished, "resume": command}, as_json)
        sys.stderr.write(f"interrupted: {exc.finished} trial(s) finished, the running one marked failed; resume with: {command}\n")
        raise typer.Exit(130) from None
    _emit(result.to_json(), as_json)


def _resume_command(run_dir: Path, data_dir: Path, options: dict) -> str:
    """The command line that resumes this search: its data, run folder and search options + --resume."""
    import shlex

    args = ["fit", str(data_dir), "--out", str(run_dir)]
    for flag, value in options.items():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is True:
                args.append(flag)
            elif v not in (None, False):
                args += [flag, str(v)]
    return "autotl " + shlex.join(args + ["--resume"])


@app.command()
def predict(
    model_path: Path = typer.Argument(..., help="model.onnx written by `autotl fit` (model.json beside it)."),
    paths: List[Path] = typer.Argument(..., help="Image files or folders."),
    top_k: int = typer.Option(3, "--top-k", "-k", help="Labels to show per image."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Also write a CSV file."),
) -> None:
    """Classify images with an exported model (onnxruntime only; no torch)."""
    from .predict import predict as predict_api

    _console.set_quiet(as_json)
    result = predict_api(model_path, paths, top_k=top_k)
    if csv:
        result.to_csv(csv)
    if as_json:
        _emit(result.to_json(), True)
    else:
        _console.console.print(result.table())


@app.command()
def info(
    run: Optional[Path] = typer.Argument(None, help="A run folder or model.onnx: show its model card."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show the environment (versions, device, offline weights, cache) or a model card."""
    if run is not None:
        from .card import ModelCard, card_path_for

        card = ModelCard.load(run / "model.json" if run.is_dir() else card_path_for(run))
        doc = card.to_json()
    else:
        import onnxruntime
        import timm
        import torch

        from .fit import default_cache_dir
        from .models import list_packaged_models

        doc = {
            "autotl": __version__, "python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
            "onnxruntime": onnxruntime.__version__, "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "packaged_models": list_packaged_models(), "cache_dir": str(default_cache_dir()),
        }
    if as_json:
        _emit(doc, True)
    else:
        from rich.pretty import Pretty

        _console.console.print(Pretty(doc))


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/demo)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Generate a small image set and fit it end to end, offline (a smoke test of the install)."""
    from .demo import demo as demo_api

    _console.set_quiet(as_json)
    result = demo_api(out)
    _emit(result.to_json(), as_json)


app.command("worker")(worker_command)
app.command("dropout")(dropout_command)
app.command("report")(report_command)
app.command("score")(score_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int):  # click returns typer.Exit's code when standalone_mode is off
            return rc
    except AutotlError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 130
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
