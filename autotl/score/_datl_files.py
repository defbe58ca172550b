"""DATL weights on disk: ``<run>/datl/<model>.npz`` (p_t, p_s, w, source class names) per model."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._io import atomic_path
from ..errors import AutotlError

if TYPE_CHECKING:
    from ._row import ScoreRow

DATL_DIR = "datl"


def safe_label(label: str) -> str:
    """A model label as a file name (``datl/<safe_label>.npz``)."""
    return re.sub(r"[^A-Za-z0-9_.@+\-]", "_", str(label)).strip(".") or "model"


def datl_weights_file(label: str) -> str:
    """Where the DATL weights of model ``label`` live, relative to the run folder."""
    return f"{DATL_DIR}/{safe_label(label)}.npz"


def save_datl_weights(run_dir: str | os.PathLike, row: ScoreRow) -> Path:
    """Write ``row``'s DATL weights (it must have them) to ``run_dir/datl/<model>.npz``."""
    path = Path(run_dir) / datl_weights_file(row.label)
    weights = row.weights
    names = row.class_names or [str(i) for i in range(weights.p_t.size)]
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, p_t=weights.p_t, p_s=weights.p_s, w=weights.w,
                class_names=np.array([str(n) for n in names]), model=np.array(row.label),
                prior=np.array(row.datl["prior"]), score=np.array(weights.score),
            )
    return path


def load_datl_weights(run_dir: str | os.PathLike, model_label: str, field: str = "w") -> tuple[np.ndarray, list[str]]:
    """(w, source class names) saved by ``autotl score`` / ``fit`` for one model of a run;
    ``field="p_t"`` gives the target distribution P_t instead (to pair with another P_s, e.g. a pool's)."""
    if field not in ("w", "p_t", "p_s"):
        raise ValueError(f"field must be 'w', 'p_t' or 'p_s', got {field!r}")
    folder = Path(run_dir) / DATL_DIR
    path = Path(run_dir) / datl_weights_file(model_label)
    if not path.is_file():
        have = sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []
        raise AutotlError(
            f"{path}: no DATL weights for model {model_label!r} in this run"
            + (f" (have: {', '.join(have)})" if have else "")
            + "; run `autotl score` with --out on this run folder first"
        )
    with np.load(path, allow_pickle=False) as z:
        return np.array(z[field], dtype=np.float64), [str(n) for n in z["class_names"]]
