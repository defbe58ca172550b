"""``autotl worker``: join a study in a shared storage and run its trials on this host's device."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from . import _console


def worker_command(
    storage: str = typer.Option(..., "--storage", help="The study's Optuna storage URL (postgresql://user@host/db, ...)."),
    study: str = typer.Option(..., "--study", help="Study name (created by `autotl fit DIR --storage URL --study NAME`)."),
    data: Optional[Path] = typer.Option(None, "--data", help="The data folder on this host (default: the path stored in the study)."),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", help="Stop after this many trials of this worker (default: until the study has its target)."),
    artifacts: Optional[Path] = typer.Option(None, "--artifacts", help="Shared artefact folder (default: the fit's RUN_DIR/artifacts, stored in the study)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Local scratch folder of this worker (default: a temp folder)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    cache_dir: Optional[Path] = typer.Option(None, help="Feature cache folder (default ~/.cache/autotl/features)."),
    heartbeat: Optional[int] = typer.Option(None, "--heartbeat", help="Heartbeat interval in seconds (env AUTOTL_HEARTBEAT_INTERVAL, default 60)."),
    grace: Optional[int] = typer.Option(None, "--grace", help="Seconds without heartbeat before a running trial is failed and retried (env AUTOTL_GRACE_PERIOD, default 2 x heartbeat)."),
    max_retry: Optional[int] = typer.Option(None, "--max-retry", help="Retries of a trial whose worker died (env AUTOTL_MAX_RETRY, default 3)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Join a search study in a shared storage and run its trials until it reaches its target."""
    from .models import set_torch_threads
    from .search._distributed import ENV_GRACE, ENV_INTERVAL, ENV_RETRY, run_worker

    for env, value in ((ENV_INTERVAL, heartbeat), (ENV_GRACE, grace), (ENV_RETRY, max_retry)):
        if value is not None:
            os.environ[env] = str(value)
    _console.set_quiet(as_json)
    if not os.environ.get("OMP_NUM_THREADS"):  # several workers on one host set it to share the cores
        set_torch_threads()
    result = run_worker(storage, study, data_dir=data, trials=trials, artifacts=artifacts, out=out, device=device,
                        cache_dir=cache_dir)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
        sys.stdout.flush()
