"""``autotl dropout DIR``: the data-dropout dry run (inspect / clean without training).

Registered in ``autotl/cli.py`` with ``app.command("dropout")(dropout_command)``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .. import _console

DEFAULT_TAU = "1.0"  # keep in step with dryrun.DEFAULT_INSPECT_TAU (no torch import at CLI start-up)


def dropout_command(
    data_dir: Path = typer.Argument(..., help="Folder with one sub-folder per class, or train/ and val/ (and an optional test/)."),
    tau: str = typer.Option(DEFAULT_TAU, "--tau", help="Drop images scoring above TAU robust spreads (0 = every image predicted to hurt, "
                                                       "the paper's rule); 'none' only scores. With --mode fraction: share of harmful images."),
    mode: str = typer.Option("spread", "--mode", help="spread (tau in robust-spread units) or fraction (tau = share of the harmful images)."),
    focus_class: Optional[str] = typer.Option(None, "--focus-class", help="Use only this class's validation images as the reference."),
    model: str = typer.Option("tf_efficientnet_lite0", "--model", "-m", help="timm model that scores the images: NAME, NAME@SIZE, NAME=CHECKPOINT or NAME=random."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for dropped.csv, influence.csv, dropped.jpg (default runs/<data>-dropout-<time>)."),
    top: int = typer.Option(20, "--top", help="Most harmful images to show."),
    write_clean: Optional[Path] = typer.Option(None, "--write-clean", help="Write a cleaned copy (train/ without the dropped images, val/, test/) to this new folder."),
    copy: bool = typer.Option(False, "--copy", help="With --write-clean: copy the files instead of hard-linking them."),
    l2: float = typer.Option(1e-2, "--l2", help="L2 damping of the convex head (features scaled to unit mean squared norm)."),
    val_fraction: float = typer.Option(0.1, help="Validation share per class when there is no val/ folder."),
    seed: int = typer.Option(0, help="Seed for the validation split."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Show (and optionally remove) the training images predicted to hurt validation loss, without training."""
    from .dryrun import inspect_dropout

    _console.set_quiet(as_json)
    result = inspect_dropout(
        data_dir, model=model, tau=tau, mode=mode, focus_class=focus_class, out=out, l2=l2, val_fraction=val_fraction,
        seed=seed, device=device, cache_dir=cache_dir, top=top, write_clean=write_clean, link=not copy, show=not as_json,
    )
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2, default=str) + "\n")
        sys.stdout.flush()
