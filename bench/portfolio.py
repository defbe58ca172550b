"""Learn the default recipe's portfolio of probe configurations on development tasks (never the suite's).

    nice python bench/portfolio.py [--tasks dev-digits15 ...] [--seeds 0 1] [--name portfolio]

For every development task (``bench/suite.py: DEV_TASKS``) and seed, every probe configuration of
the grid (which ranked backbones are concatenated, how many intermediate-stage taps, flipped views
with flip TTA, the data-dropout threshold) is cross-validated exactly as a search trial is
(``autotl.search._probe.cross_validate_probe``) and refitted on all labelled images; its held-out
accuracy is read on the task's test folder, which decides nothing here. The scikit-learn reference
(logistic regression on the top-ranked model's standardised pooled features, C by 5-fold CV, refit)
is measured beside it.

The portfolio is then built greedily as AutoGluon's zero-shot portfolios are: each step adds the
configuration that most lowers the mean held-out error of *what cross-validation would pick among
the portfolio so far* (so a configuration earns its place only if the search could find it), and
the order is the order of addition. JSON goes to ``bench/results/NAME.json`` with every measurement.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch

from _common import load_average, print_table, write_results
from suite import DEV_TASKS, available, build_task

GRID = {
    "backbones": ["1", "2", "3", "1+2", "1+2+3"],
    "taps": [0, 3],
    "flip": [False, True],
    "dropout_tau": [None, 1.0],
}


def configs() -> list[dict]:
    keys = list(GRID)
    return [dict(zip(keys, values)) for values in itertools.product(*(GRID[k] for k in keys))]


def key_of(cfg: dict) -> str:
    return f"b{cfg['backbones']}-t{cfg['taps']}-f{int(cfg['flip'])}-d{cfg['dropout_tau']}"


def reference_accuracy(run, test_samples, seed: int) -> dict:
    """scikit-learn: LogisticRegressionCV (C by stratified 5-fold CV) on the top-ranked model's
    standardised pooled features of all labelled images, refitted, scored on the test folder."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    label = run.labels[0]
    ex = run.extractors[label]
    labelled = list(run.index.train) + list(run.index.val)
    x = ex.extract(labelled).pooled.numpy()
    y = np.array([s.label for s in labelled])
    xt = ex.extract(test_samples).pooled.numpy()
    yt = np.array([s.label for s in test_samples])
    folds = int(max(2, min(5, np.bincount(y).min())))
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=folds, max_iter=5000, random_state=seed))
    clf.fit(x, y)
    return {"test": float((clf.predict(xt) == yt).mean()), "model": label, "C": float(clf[-1].C_[0])}


def measure_task(task: str, seed: int, work: Path, cache: Path) -> dict:
    from autotl.data import scan_dataset
    from autotl.fit import _base_config, score_candidates
    from autotl.options import FitOptions
    from autotl.run import Run
    from autotl.search._folds import plan_selection
    from autotl.search._objective import Objective
    from autotl.search._probe import cross_validate_probe, refit_probe
    from autotl._recipe import parse_recipe

    root = work / f"{task}-s{seed}"
    if (root / "data").is_dir() and (root / "test").is_dir():  # rebuilt files would miss the feature cache
        data, test = root / "data", root / "test"
        shutil.rmtree(root / "run", ignore_errors=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        data, test = build_task(task, seed, root)
    run = Run.open(data, root / "run", seed=seed, cache_dir=cache)
    base = _base_config(run.index, FitOptions(frozen_stages="all", epochs=15, lr=3e-3, batch_size=64, seed=seed))
    score_candidates(run, base)
    test_index = scan_dataset(test, val_fraction=0.5, seed=seed)
    mapping = [run.index.classes.index(c) for c in test_index.classes]
    test_samples = [type(s)(s.path, mapping[s.label]) for s in test_index.train + test_index.val]
    for ex in run.extractors.values():
        ex.register(test_samples)
    selection = plan_selection(run.index, seed=seed)
    recipe = parse_recipe({"space": {"frozen_stages": "all"}}, "portfolio")
    objective = Objective(run, recipe, base, selection)
    labels_t = np.array([s.label for s in test_samples])
    labelled = list(run.index.train) + list(run.index.val)
    rows = {}
    for cfg in configs():
        params = {"frozen_stages": "all", **cfg}
        t0 = time.monotonic()
        setup = objective.setup(params)
        cv = cross_validate_probe(objective, params, setup)
        fitted, _ = refit_probe(objective, params, setup, cv.lam, statistics.fmean(cv.n_train), labelled)
        test_probs = torch.softmax(fitted.logits(test_samples).double(), 1).numpy()
        rows[key_of(cfg)] = {"cv": statistics.fmean(cv.scores), "oof_loss": cv.oof_loss[cv.chosen], "lambda": cv.lam,
                             "test": float((test_probs.argmax(1) == labels_t).mean()),
                             "fold_accuracy": cv.fold_accuracy[cv.chosen],
                             "path_fold_accuracy": cv.fold_accuracy, "se": selection.standard_error(cv.scores),
                             "oof": np.round(cv.oof[cv.chosen], 4).tolist(), "test_probs": np.round(test_probs, 4).tolist(),
                             "seconds": round(time.monotonic() - t0, 3)}
        print(f"  {task} s{seed} {key_of(cfg)}: cv {rows[key_of(cfg)]['cv']:.3f} test {rows[key_of(cfg)]['test']:.3f} "
              f"({rows[key_of(cfg)]['seconds']:.1f}s)", flush=True)
    return {"task": task, "seed": seed, "ranking": run.labels, "selection": selection.kind, "n_scored": selection.n_scored,
            "oof_labels": [s.label for s in selection.scored_samples], "test_labels": labels_t.tolist(),
            "configs": rows, "reference": reference_accuracy(run, test_samples, seed)}


def greedy_portfolio(results: list[dict], size: int) -> list[dict]:
    """Configurations in order of addition, each with the mean held-out error of the CV pick so far."""
    keys = list(results[0]["configs"])
    chosen: list[str] = []
    steps = []
    for _ in range(min(size, len(keys))):
        best = None
        for k in keys:
            if k in chosen:
                continue
            port = chosen + [k]
            errs = []
            for r in results:
                c = r["configs"]
                pick = max(port, key=lambda q: (c[q]["cv"], -c[q]["oof_loss"]))
                errs.append(1.0 - c[pick]["test"])
            mean = statistics.fmean(errs)
            if best is None or mean < best[1] - 1e-12:
                best = (k, mean)
        chosen.append(best[0])
        steps.append({"config": best[0], "mean_test_error_of_cv_pick": round(best[1], 4)})
    return steps


def _pick_max(r: dict, keys: list[str]) -> str:
    c = r["configs"]
    return max(keys, key=lambda q: (c[q]["cv"], -c[q]["oof_loss"]))


def _one_se(r: dict, keys: list[str], order: list[str]) -> list[str]:
    """The configurations within one standard error of the best mean (log-loss ties as the search)."""
    c = r["configs"]
    best = _pick_max(r, keys)
    return [q for q in keys if c[q]["cv"] >= c[best]["cv"] - c[best]["se"] - 1e-12]


def _test_acc(r: dict, probs: np.ndarray) -> float:
    return float((probs.argmax(1) == np.array(r["test_labels"])).mean())


def simulate_rules(results: list[dict], portfolio: list[str]) -> dict:
    """Held-out error of the choice each selection rule makes among the portfolio's configurations,
    per task run: the max of cross-validation, the one-standard-error rule toward the portfolio's
    order (its prior), and the average of the configurations within one standard error."""
    from autotl.ensemble import greedy_ensemble

    rules: dict[str, list[float]] = {"max": [], "one-se portfolio order": [], "average within one se": [],
                                     "greedy ensemble": []}
    for r in results:
        c = r["configs"]
        keys = [k for k in portfolio if k in c]
        rules["max"].append(1 - c[_pick_max(r, keys)]["test"])
        within = _one_se(r, keys, portfolio)
        rules["one-se portfolio order"].append(1 - c[min(within, key=keys.index)]["test"])
        avg = np.mean([np.array(c[q]["test_probs"]) for q in within], axis=0)
        rules["average within one se"].append(1 - _test_acc(r, avg))
        sel = greedy_ensemble([np.array(c[q]["oof"]) for q in keys], np.array(r["oof_labels"]), max_members=4)
        probs = sum(w * np.array(c[q]["test_probs"]) for w, q in zip(sel.weights, keys) if w > 0)
        rules["greedy ensemble"].append(1 - _test_acc(r, probs))
    return {k: {"mean_test_error": round(statistics.fmean(v), 4), "per_run": [round(x, 4) for x in v]}
            for k, v in rules.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEV_TASKS), choices=list(DEV_TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--size", type=int, default=12, help="portfolio length")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--name", default="portfolio")
    args = parser.parse_args()

    from autotl import _console
    from autotl.models import set_torch_threads

    _console.set_quiet(True)
    set_torch_threads()
    work = args.work or Path(tempfile.mkdtemp(prefix="autotl-portfolio-"))
    cache = work / "feature-cache"
    load_start = load_average()
    results, skipped = [], {}
    for task in args.tasks:
        why = available(task)
        if why:
            skipped[task] = why
            continue
        for seed in args.seeds:
            r = measure_task(task, seed, work, cache)
            results.append(r)
            best = max(r["configs"].items(), key=lambda kv: kv[1]["test"])
            print(f"{task} seed {seed}: reference {r['reference']['test']:.3f}; best config {best[0]} "
                  f"test {best[1]['test']:.3f}; plain probe {r['configs']['b1-t0-f0-dNone']['test']:.3f}", flush=True)
    steps = greedy_portfolio(results, args.size) if results else []
    table = []
    for key in results[0]["configs"] if results else []:
        tests = [r["configs"][key]["test"] for r in results]
        table.append({"config": key, "mean test acc": statistics.fmean(tests),
                      "mean cv acc": statistics.fmean(r["configs"][key]["cv"] for r in results),
                      "mean s": statistics.fmean(r["configs"][key]["seconds"] for r in results)})
    table.sort(key=lambda row: -row["mean test acc"])
    print_table("probe configurations on development tasks (mean over tasks and seeds)", table[:20],
                ["config", "mean test acc", "mean cv acc", "mean s"])
    if results:
        print("reference (sklearn) mean test acc:", round(statistics.fmean(r["reference"]["test"] for r in results), 4))
    print_table("greedy portfolio", steps, ["config", "mean_test_error_of_cv_pick"])
    rules = simulate_rules(results, [s["config"] for s in steps]) if results else {}
    for name, v in rules.items():
        print(f"selection rule {name}: mean held-out error {v['mean_test_error']:.4f}")
    write_results(args.name, {"tasks": {t: DEV_TASKS[t] for t in args.tasks}, "seeds": args.seeds, "grid": GRID,
                              "load_average_at_start": load_start, "results": results, "table": table,
                              "portfolio": steps, "selection_rules": rules, "skipped": skipped})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
