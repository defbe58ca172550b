"""Influence-based data dropout on cats_vs_dogs with 0 / 20 / 40 % of the training labels flipped.

For each flip seed (``--seeds``, default 3; per seed the flipped sets are nested: the 20 % are part
of the 40 %), each flip rate and each ``dropout_tau`` the real strategy (``DataDropout.apply``, mode "spread") picks the images to drop,
then autotl's linear probe (``train_model`` with ``frozen_stages="all"``, the default fit settings)
trains on the kept images.  Reported: how many images were dropped, precision (share of the dropped
images that were flipped) and recall (share of the flipped images that were dropped), validation
accuracy of the linear probe and of the convex influence head refitted on the kept images, and the
time of the influence step (convex head fit + one solve) against one linear-probe fit.  The table
aggregates over the flip seeds: mean ± standard deviation over every linear-probe fit of the cell
(seeds x probe seeds), and the paired gain over no dropout at the same flip rate and seed (mean ±
sd over flip seeds), so a gain smaller than its spread reads as no gain.

Labels are flipped in memory on the ``Sample`` objects; the image files are never touched.  The
validation split is clean and is used three times, as in a real search: as the influence reference,
for early stopping, and to report accuracy; choosing tau by this table is choosing it on validation
(what the search does), so the "best tau" row is optimistic by construction.  No test split is
provided with this data set (see ../shared/data/README.md), and none is read.

Run (the features of the lead's ``autotl fit`` run are reused from ~/.cache/autotl/features)::

    nice -n 10 python bench/dropout.py          # table on stdout, bench/results/dropout.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cats_vs_dogs"


def _flip(index, rate: float, seed: int):
    """Noisy copies of the training samples: the first round(rate*N) of one seeded permutation get
    another class (binary: the other one).  Returns (samples, flipped mask)."""
    from autotl.data import Sample

    n, k = len(index.train), index.num_classes
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    offsets = rng.integers(1, k, n)  # drawn for every image, so the rates are nested
    flipped = np.zeros(n, dtype=bool)
    flipped[order[: int(round(rate * n))]] = True
    labels = np.array([s.label for s in index.train])
    noisy = np.where(flipped, (labels + offsets) % k, labels)
    return [Sample(s.path, int(y)) for s, y in zip(index.train, noisy)], flipped


def _convex_accuracy(train_x, train_y, val_x, val_y, keep, num_classes, l2) -> float:
    from autotl.dropout import fit_logistic_head
    from autotl.dropout.strategy import _standardise

    xs, xvs = _standardise(np.asarray(train_x, np.float64)[keep], np.asarray(val_x, np.float64))
    head = fit_logistic_head(xs, np.asarray(train_y)[keep], num_classes, l2=l2)
    return float((head.predict_proba(xvs).argmax(1) == np.asarray(val_y)).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4])
    ap.add_argument("--taus", nargs="+", default=["none", "3", "2", "1", "0.5", "0"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the label flips")
    ap.add_argument("--probe-seeds", type=int, default=2, help="linear-probe fits (seeds) per flip seed and cell")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dropout.json")
    ap.add_argument("--show", type=Path, default=None, help="only print the table of an earlier results file")
    args = ap.parse_args(argv)
    if args.show is not None:
        doc = json.loads(args.show.read_text())
        print(_table(doc["cells"]))
        for line in _summary(doc["cells"], doc["rates"] if "rates" in doc else sorted({c["flip_rate"] for c in doc["cells"]}),
                             doc["n_val"])["lines"]:
            print(line)
        return 0

    if not (args.data / "train").is_dir():
        print(f"skipped: {args.data} is absent (real-photo benchmark data lives in ../shared/data)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from autotl import _console
    from autotl.data import scan_dataset
    from autotl.activations import SharedActivations
    from autotl._memory import BoundedMemory
    from autotl.dropout.strategy import DEFAULT_L2, DataDropout, parse_tau
    from autotl.features import FeatureExtractor
    from autotl.run import default_cache_dir
    from autotl.models import create_source_model, set_torch_threads
    from autotl.strategy import StrategyContext
    from autotl.train import TrainConfig, train_model

    _console.set_quiet(True)
    set_torch_threads()
    index = scan_dataset(args.data)
    if index.test:
        print("note: a test split exists; it is not read by this benchmark")
    source = create_source_model(args.model)
    # same images, other labels: the relabelled copies are served from these lists' activations
    extractor = SharedActivations(FeatureExtractor(source, cache_dir=default_cache_dir()), index.train, index.val)
    t0 = time.perf_counter()
    tr = extractor.extract(index.train, description="train features")
    va = extractor.extract(index.val, description="val features")
    feature_seconds = time.perf_counter() - t0
    features_cached = extractor.forward_batches == 0
    k = index.num_classes
    strategy = DataDropout()
    taus = [parse_tau(t) for t in args.taus]

    rows, timing = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for flip_seed, rate in [(fs, r) for fs in args.seeds for r in args.rates]:
            noisy, flipped = _flip(index, rate, flip_seed)
            noisy_y = np.array([s.label for s in noisy])
            memory = BoundedMemory()  # one run per noisy copy: its taus share the influence
            influence_s = influence_cpu = float("nan")
            here = []
            for tau in taus:
                cfg = TrainConfig(frozen_stages="all", seed=0)
                ctx = StrategyContext(index, source, extractor, Path(tmp), cfg, list(noisy), memory=memory)
                params = {"dropout_tau": tau}
                if strategy.is_active(params):
                    c0 = time.process_time()
                    strategy.apply(ctx, params)
                    cpu = time.process_time() - c0
                    notes = ctx.notes["dropout"]
                    if not notes["cached"]:
                        influence_s, influence_cpu = notes["seconds"], cpu
                else:
                    notes = None
                kept_paths = {s.path for s in ctx.train_samples}
                keep = np.array([s.path in kept_paths for s in noisy])
                dropped = ~keep
                n_drop = int(dropped.sum())
                # precision is about the injected noise: undefined when nothing was flipped
                precision = float(flipped[dropped].mean()) if n_drop and flipped.any() else float("nan")
                recall = float(flipped[dropped].sum() / flipped.sum()) if flipped.any() else float("nan")
                accs, probe_s, probe_cpu = [], [], []
                for s in range(args.probe_seeds):
                    # probe seeds differ between flip seeds, so the 0 % rows (same data) have a spread too
                    cfg_s = TrainConfig(frozen_stages="all", seed=100 * flip_seed + s)
                    t1, c1 = time.perf_counter(), time.process_time()
                    res = train_model(source, ctx.train_samples, index.val, k, cfg_s, extractor=extractor, device="cpu")
                    probe_s.append(time.perf_counter() - t1)
                    probe_cpu.append(time.process_time() - c1)
                    accs.append(res.best.accuracy)
                convex = _convex_accuracy(tr.pooled.numpy(), noisy_y, va.pooled.numpy(), va.labels.numpy(), keep, k, DEFAULT_L2)
                row = {
                    "flip_seed": flip_seed, "flip_rate": rate, "tau": tau, "n_flipped": int(flipped.sum()),
                    "n_dropped": n_drop, "flipped_dropped": int((flipped & dropped).sum()),
                    "precision": precision, "recall": recall,
                    "lp_val_acc_mean": float(np.mean(accs)), "lp_val_acc": [float(a) for a in accs],
                    "convex_val_acc": convex,
                    "lp_fit_seconds": float(np.median(probe_s)), "lp_fit_cpu_seconds": float(np.median(probe_cpu)),
                    "threshold": None if notes is None else notes["threshold"],
                    "spread": None if notes is None else notes["spread"],
                    "threshold_rule": None if notes is None else notes.get("threshold_rule"),
                }
                rows.append(row)
                here.append(row)
                print(_fmt_row(row), flush=True)
            timing.append({"flip_seed": flip_seed, "flip_rate": rate, "influence_seconds": influence_s,
                           "influence_cpu_seconds": influence_cpu,
                           "lp_fit_seconds": float(np.median([r["lp_fit_seconds"] for r in here])),
                           "lp_fit_cpu_seconds": float(np.median([r["lp_fit_cpu_seconds"] for r in here]))})

    cells = _cells(rows, args.rates, taus)
    summary = _summary(cells, args.rates, len(index.val))
    doc = {
        "benchmark": "data dropout (influence, convex head on frozen features) on cats_vs_dogs with flipped labels",
        "data": str(args.data), "n_train": len(index.train), "n_val": len(index.val), "classes": index.classes,
        "model": source.label, "weights": source.weights_origin, "l2": DEFAULT_L2, "mode": "spread",
        "flip_seeds": list(args.seeds), "probe_seeds": args.probe_seeds,
        "linear_probe": "autotl train_model, frozen_stages=all, default TrainConfig (AdamW, 15 epochs, label smoothing 0.1, early stopping on val)",
        "features_from_cache": features_cached, "feature_seconds": round(feature_seconds, 2),
        "decided_by": "val split: influence reference, early stopping, and the accuracy reported; tau per row is fixed, "
                      "'best tau' is chosen on val (as the search would); no test split read",
        "spreads": "acc: mean ± sd over all linear-probe fits of a cell (flip seeds x probe seeds); gain: paired "
                   "(same flip rate and seed) difference to no dropout, mean ± sd over flip seeds; counts: mean ± sd over flip seeds",
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "cpus": os.cpu_count(), "note": "2 shared CPU cores, other jobs running: timings are indicative"},
        "cells": cells, "rows": rows, "timing": timing, "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from autotl._io import atomic_write_json

    atomic_write_json(args.out, _no_nan(doc))
    print()
    print(_table(cells))
    print()
    for t in timing:
        print(f"seed {t['flip_seed']} flip {t['flip_rate']:.0%}: influence step (head fit + solve) {t['influence_seconds']:.2f}s wall / "
              f"{t['influence_cpu_seconds']:.2f}s CPU vs one linear-probe fit {t['lp_fit_seconds']:.2f}s wall / "
              f"{t['lp_fit_cpu_seconds']:.2f}s CPU (median; features {'from cache' if features_cached else f'{feature_seconds:.0f}s'})")
    for line in summary["lines"]:
        print(line)
    print(f"wrote {args.out}")
    return 0


def _mean_sd(values) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and np.isnan(x))], dtype=float)
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _cells(rows, rates, taus) -> list[dict]:
    """One cell per (flip rate, tau) over the flip seeds; gains paired with no dropout per seed."""
    cells = []
    for rate in rates:
        for tau in taus:
            here = [r for r in rows if r["flip_rate"] == rate and r["tau"] == tau]
            if not here:
                continue
            base = {r["flip_seed"]: r for r in rows if r["flip_rate"] == rate and r["tau"] is None}
            gains = [100 * (r["lp_val_acc_mean"] - base[r["flip_seed"]]["lp_val_acc_mean"])
                     for r in here if r["flip_seed"] in base]
            accs = [100 * a for r in here for a in r["lp_val_acc"]]
            cell = {"flip_rate": rate, "tau": tau, "n_seeds": len(here), "n_flipped": _mean_sd(r["n_flipped"] for r in here)[0],
                    "threshold_rule": here[0]["threshold_rule"]}
            for key, vals in (("n_dropped", [r["n_dropped"] for r in here]),
                              ("precision", [r["precision"] for r in here]), ("recall", [r["recall"] for r in here]),
                              ("lp_val_acc", accs), ("gain_vs_no_dropout", gains),
                              ("convex_val_acc", [100 * r["convex_val_acc"] for r in here])):
                cell[f"{key}_mean"], cell[f"{key}_sd"] = _mean_sd(vals)
            cells.append(cell)
    return cells


def _no_nan(obj):
    """Strict JSON: NaN (undefined precision/recall) becomes null."""
    if isinstance(obj, float) and np.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _no_nan(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_no_nan(v) for v in obj]
    return obj


def _tau_text(tau) -> str:
    return "none" if tau is None else f"{tau:g}"


def _pct(x) -> str:
    return "  -  " if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * x:5.1f}"


def _fmt_row(r) -> str:
    return (f"seed {r['flip_seed']} flip {r['flip_rate']:.0%} tau {_tau_text(r['tau']):>4}: dropped {r['n_dropped']:4d} "
            f"(flipped {r['flipped_dropped']:4d}/{r['n_flipped']}) P {_pct(r['precision'])} R {_pct(r['recall'])} "
            f"LP acc {100 * r['lp_val_acc_mean']:.2f} convex {100 * r['convex_val_acc']:.2f}")


def _pm(mean, sd, digits=2) -> str:
    if mean is None or sd is None or np.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _table(cells) -> str:
    head = ("| flip | tau | dropped | precision % | recall % | LP val acc % | gain vs no dropout (pp, paired) "
            "| convex head val acc % |")
    lines = [head, "|" + "---|" * 8]
    for c in cells:
        prec = _pm(*(None if v is None else 100 * v for v in (c["precision_mean"], c["precision_sd"])), 1) \
            if c["precision_mean"] is not None and not np.isnan(c["precision_mean"]) else "-"
        rec = _pm(*(100 * v for v in (c["recall_mean"], c["recall_sd"])), 1) \
            if c["recall_mean"] is not None and not np.isnan(c["recall_mean"]) else "-"
        lines.append(f"| {c['flip_rate']:.0%} | {_tau_text(c['tau'])} | {_pm(c['n_dropped_mean'], c['n_dropped_sd'], 0)} "
                     f"| {prec} | {rec} | {_pm(c['lp_val_acc_mean'], c['lp_val_acc_sd'])} "
                     f"| {'-' if c['tau'] is None else _pm(c['gain_vs_no_dropout_mean'], c['gain_vs_no_dropout_sd'])} "
                     f"| {_pm(c['convex_val_acc_mean'], c['convex_val_acc_sd'])} |")
    return "\n".join(lines)


def _summary(cells, rates, n_val: int) -> dict:
    """Per flip rate: the tau with the best mean val accuracy, and whether its paired gain counts:
    more than twice its spread over seeds and more than one validation image."""
    out = {"lines": []}
    for rate in rates:
        cand = [c for c in cells if c["flip_rate"] == rate and c["tau"] is not None]
        none = next((c for c in cells if c["flip_rate"] == rate and c["tau"] is None), None)
        if not cand or none is None:
            continue
        best = max(cand, key=lambda c: (c["lp_val_acc_mean"], -c["n_dropped_mean"]))
        g, sd = best["gain_vs_no_dropout_mean"], best["gain_vs_no_dropout_sd"]
        one_image = 100.0 / max(1, n_val)
        verdict = ("gain" if g > 2 * sd and g > one_image + 1e-6 else
                   f"no gain (within 2 sd or one val image = {one_image:.3g} pp)" if g > 0 else "no gain")
        out[f"flip_{rate:g}"] = {"no_dropout_acc": none["lp_val_acc_mean"], "best_tau_on_val": best["tau"],
                                 "best_acc": best["lp_val_acc_mean"], "gain_mean": g, "gain_sd": sd, "verdict": verdict}
        out["lines"].append(f"flip {rate:.0%}: no dropout {_pm(none['lp_val_acc_mean'], none['lp_val_acc_sd'])}%; "
                            f"best tau on val = {_tau_text(best['tau'])}: {_pm(best['lp_val_acc_mean'], best['lp_val_acc_sd'])}%, "
                            f"paired gain {_pm(g, sd)} pp: {verdict}")
    return out


if __name__ == "__main__":
    sys.exit(main())
