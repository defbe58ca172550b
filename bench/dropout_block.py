"""Influence through the last block vs the convex head: which flipped labels each finds, and its cost.

cats_vs_dogs with 20 / 40 % of the training labels flipped (the flips of ``bench/dropout.py``, seeds
``--seeds``). For each seed and rate, both influence variants score every training image against the
clean validation split (``compute_influence``: convex head on pooled frozen features;
``compute_block_influence``: the last stage + head, CG with Hessian-vector products, on the cached
activations at the last stage's input); the paper's rule (tau 0: drop every image with positive
influence) and tau = 2 robust spreads select the images to drop. Reported: dropped, precision and
recall on the flipped images (mean ± sd over seeds), seconds per influence step. No model is
trained: fine-tuning the last stage per cell is beyond this machine's budget, so this measures the
selection only. The test split is never read.

    nice -n 10 python bench/dropout_block.py      # table on stdout, bench/results/dropout_block.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from dropout import DEFAULT_DATA, _flip, _mean_sd, _pm  # noqa: E402  (same flips, same helpers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.2, 0.4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--taus", type=float, nargs="+", default=[0.0, 2.0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dropout_block.json")
    args = ap.parse_args(argv)
    if not (args.data / "train").is_dir():
        print(f"skipped: {args.data} is absent (real-photo benchmark data lives in ../shared/data)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from autotl import _console
    from autotl.data import scan_dataset
    from autotl.dropout import select_dropout
    from autotl.dropout.strategy import DEFAULT_L2, compute_block_influence, compute_influence
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model, set_torch_threads
    from autotl.run import default_cache_dir

    _console.set_quiet(True)
    set_torch_threads()
    index = scan_dataset(args.data)
    source = create_source_model(args.model)
    ex = FeatureExtractor(source, cache_dir=default_cache_dir())
    cut = ex.num_stages - 1
    t0 = time.perf_counter()
    tr = ex.extract(index.train, [cut], description="train features")
    va = ex.extract(index.val, [cut], description="val features")
    feature_seconds = time.perf_counter() - t0
    k = index.num_classes
    rows = []
    for seed in args.seeds:
        for rate in args.rates:
            noisy, flipped = _flip(index, rate, seed)
            y = np.array([s.label for s in noisy])
            for variant in ("head", "block"):
                if variant == "head":
                    out = compute_influence(tr.pooled, y, va.pooled, va.labels, k, l2=DEFAULT_L2)
                else:
                    out = compute_block_influence(source, cut, tr.at(cut, ex.num_stages), y, va.at(cut, ex.num_stages),
                                                  va.labels, k, l2=DEFAULT_L2)
                res = out.result
                for tau in args.taus:
                    keep, rep = select_dropout(res.scores, tau, labels=y)
                    dropped = ~keep
                    row = {"seed": seed, "flip_rate": rate, "variant": variant, "tau": tau,
                           "n_dropped": int(dropped.sum()),
                           "precision": float(flipped[dropped].mean()) if dropped.any() else float("nan"),
                           "recall": float(flipped[dropped].sum() / flipped.sum()),
                           "seconds": out.seconds, "solver": res.solver, "cg_iterations": res.cg_iterations,
                           "residual": res.residual, "grad_norm": res.train_grad_norm}
                    rows.append(row)
                    print(f"seed {seed} flip {rate:.0%} {variant:5s} tau {tau:g}: dropped {row['n_dropped']} "
                          f"P {100 * row['precision']:.1f} R {100 * row['recall']:.1f} ({out.seconds:.1f}s, "
                          f"CG {res.cg_iterations} it, residual {res.residual:.1e}, |grad| {res.train_grad_norm:.1e})",
                          flush=True)
            _write(args, source, cut, index, feature_seconds, rows)
    table = _write(args, source, cut, index, feature_seconds, rows)
    print(table)
    print(f"wrote {args.out}")
    return 0


def _write(args, source, cut, index, feature_seconds, rows) -> str:
    """Cells (mean ± sd over the seeds done so far) and the JSON file; rewritten after every seed and rate."""
    from autotl._io import atomic_write_json
    from autotl.dropout.strategy import DEFAULT_L2

    cells = []
    for rate in args.rates:
        for variant in ("head", "block"):
            for tau in args.taus:
                here = [r for r in rows if r["flip_rate"] == rate and r["variant"] == variant and r["tau"] == tau]
                cell = {"flip_rate": rate, "variant": variant, "tau": tau}
                for key in ("n_dropped", "precision", "recall", "seconds"):
                    cell[f"{key}_mean"], cell[f"{key}_sd"] = _mean_sd([r[key] for r in here])
                cells.append(cell)
    lines = ["| flip | influence | tau | dropped | precision % | recall % | seconds |", "|---|---|---|---|---|---|---|"]
    for c in cells:
        lines.append(f"| {c['flip_rate']:.0%} | {c['variant']} | {c['tau']:g} | {_pm(c['n_dropped_mean'], c['n_dropped_sd'], 0)} "
                     f"| {_pm(100 * c['precision_mean'], 100 * c['precision_sd'], 1)} "
                     f"| {_pm(100 * c['recall_mean'], 100 * c['recall_sd'], 1)} | {_pm(c['seconds_mean'], c['seconds_sd'], 1)} |")
    table = "\n".join(lines)
    doc = {"benchmark": "data dropout: influence through the last block vs the convex head (selection only)",
           "data": str(args.data), "model": source.label, "cut": cut, "l2": DEFAULT_L2, "seeds": sorted({r["seed"] for r in rows}),
           "n_train": len(index.train), "n_val": len(index.val), "feature_seconds": round(feature_seconds, 1),
           "spreads": "mean ± sd over flip seeds", "cells": cells, "rows": rows, "table": table,
           "host": "2 shared CPU cores, other jobs running: timings are indicative"}
    atomic_write_json(args.out, doc)
    return table


if __name__ == "__main__":
    sys.exit(main())
