"""``autotl worker``: join a study in a shared storage and run its trials on this host's device."""

from __future__ import annotations

import os


def join_study(
    storage: str,
    study: str,
    *,
    data_dir: str | os.PathLike | None = None,
    trials: int | None = None,
    artifacts: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    heartbeat: int | None = None,
    grace: int | None = None,
    max_retry: int | None = None,
):
    """Join study ``study`` in ``storage`` and run its trials until it has its target (``WorkerResult``).

    ``heartbeat``, ``grace`` and ``max_retry`` override ``AUTOTL_HEARTBEAT_INTERVAL``,
    ``AUTOTL_GRACE_PERIOD`` and ``AUTOTL_MAX_RETRY`` (the stale-trial rules the study's other
    workers read from their environment too); the rest is ``autotl.search.run_worker``'s.
    """
    from .options import check_worker_options

    check_worker_options(storage=storage, study=study, data_dir=data_dir, trials=trials, artifacts=artifacts, out=out,
                         device=device, cache_dir=cache_dir, heartbeat=heartbeat, grace=grace, max_retry=max_retry)
    from .models import set_torch_threads
    from .search._distributed import ENV_GRACE, ENV_INTERVAL, ENV_RETRY
    from .search._worker import run_worker

    for env, value in ((ENV_INTERVAL, heartbeat), (ENV_GRACE, grace), (ENV_RETRY, max_retry)):
        if value is not None:
            os.environ[env] = str(value)
    if not os.environ.get("OMP_NUM_THREADS"):  # several workers on one host set it to share the cores
        set_torch_threads()
    return run_worker(storage, study, data_dir=data_dir, trials=trials, artifacts=artifacts, out=out, device=device,
                      cache_dir=cache_dir)
