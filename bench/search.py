"""Strategy search vs baselines at an equal wall-clock budget, on clean and noisy Cats vs Dogs.

    nice -n 10 python bench/search.py [--data ../shared/data/cats_vs_dogs] [--budget 150] [--noise 0.2 0.4]

Data: the bench writes copies of the data set (symlinks, fixed seed) in a work folder: ``train/``
with the labels of 0 % / 20 % / 40 % of the training images flipped to another class, and the
original ``val/`` split in two halves — ``val/`` (decides: early stopping, trial selection) and
``test/`` (held out: reported only), so the search's selection on val does not flatter it.
The copies have the same image bytes as the original, so their activation cache is seeded from the
original's (features of the same pixels; labels of the copy) instead of a new forward pass.

Methods, each with the same budget of ``--budget`` seconds of training:
- ``linear probe``: ``autotl fit`` defaults (all stages frozen, lr 3e-3, 15 epochs);
- ``fine-tune last stage``: the last stage trainable (backbone lr ×0.1), 15 epochs or the budget;
- ``search``: the ``default`` recipe, ``--trials 20 --time-budget BUDGET``, then the best strategy
  refit on train and scored on test.
Cache: one 1-epoch last-stage trial with and without the prefix cache (``use_cache=False``
decodes, augments and runs the frozen prefix on every image every epoch).
"""

from __future__ import annotations

import argparse
import os

# Many processes share this machine's 2 cores; OpenMP's default spin-waiting then wastes most of the
# CPU (measured: a 64-image last-stage step 1.1-1.3 s spinning vs 0.33 s passive at load ~8).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import print_table, shared_dataset, write_results
from autotl import _console
from autotl.data import scan_dataset
from autotl.features import FeatureExtractor
from autotl.fit import default_cache_dir, evaluate
from autotl.models import create_source_model, set_torch_threads
from autotl.search import plan_search, select_best
from autotl.train import TrainConfig, train_model


# ------------------------------------------------------------------------------------------ data
def make_copy(src: Path, dst: Path, noise: float, seed: int = 0) -> Path:
    """``dst/{train,val,test}/<class>/`` symlinks: train labels flipped for ``noise`` of the images,
    val split in two halves (val / test), per class, by a fixed permutation."""
    if dst.exists():
        shutil.rmtree(dst)
    index = scan_dataset(src)
    classes = index.classes
    rng = np.random.default_rng(seed)
    flip = rng.random(len(index.train)) < noise
    for i, s in enumerate(index.train):
        label = s.label
        if flip[i]:
            label = (label + 1 + int(rng.integers(len(classes) - 1))) % len(classes)
        _link(s.path, dst / "train" / classes[label] / f"{i:05d}{s.path.suffix}")
    for c in range(len(classes)):
        own = [s for s in index.val if s.label == c]
        order = np.random.default_rng([seed, c]).permutation(len(own))
        for rank, j in enumerate(order):
            split = "val" if rank < (len(own) + 1) // 2 else "test"
            _link(own[j].path, dst / split / classes[c] / f"{j:05d}{own[j].path.suffix}")
    return dst


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.realpath(target), link)


def seed_cache(source, original, copy, cache_dir: Path, cuts: list[int]) -> None:
    """Store the copy's activations under its own cache keys, gathered from the original's
    (same pixels; labels from the copy). Costs no forward pass when the original is cached."""
    ex = FeatureExtractor(source, cache_dir=cache_dir)
    by_real = {}
    for split in ("train", "val"):
        samples = getattr(original, split)
        acts = ex.extract(samples, cuts, description=f"original {split}")
        for row, s in enumerate(samples):
            by_real[os.path.realpath(s.path)] = (acts, row)
    for split in ("train", "val", "test"):
        samples = getattr(copy, split)
        if not samples:
            continue
        key = ex._key(samples)
        if all(ex._load(key, w) is not None for w in ("labels", "pooled", "logits", *[f"cut{c}" for c in cuts])):
            continue
        rows = [by_real[os.path.realpath(s.path)] for s in samples]
        ex._store(key, "labels", np.array([s.label for s in samples], dtype=np.int64))
        ex._store(key, "pooled", np.stack([a.pooled[r].numpy() for a, r in rows]))
        ex._store(key, "logits", np.stack([a.source_logits[r].numpy() for a, r in rows]) if rows[0][0].source_logits is not None
                  else np.zeros((len(rows), 0), np.float32))
        for c in cuts:
            ex._store(key, f"cut{c}", np.stack([a.maps[c][r].numpy() for a, r in rows]))


# ------------------------------------------------------------------------------------------ methods
def baseline(source, index, cfg: TrainConfig, budget: float, cache_dir: Path) -> dict:
    ex = FeatureExtractor(source, cache_dir=cache_dir)
    t0 = time.monotonic()
    result = train_model(source, index.train, index.val, len(index.classes), cfg, extractor=ex,
                         deadline=t0 + budget)
    seconds = time.monotonic() - t0
    test = evaluate(result, ex, index.test, index.classes)
    return {"val_acc": result.best.accuracy, "test_acc": test["accuracy"], "trials": 1, "seconds": seconds,
            "epochs_run": len(result.history), "cached": result.cached}


def search(index, run_dir: Path, budget: float, trials: int, cache_dir: Path, model: str) -> dict:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    base = TrainConfig(objective="accuracy")
    plan = plan_search(index, run_dir, [model], base, device="cpu", cache_dir=cache_dir, trials=trials,
                       time_budget=budget, recipe="default")
    t0 = time.monotonic()
    out = plan.run()
    seconds = time.monotonic() - t0
    best = select_best(out.study)
    params = plan.recipe.params_of(best.params, plan.objective.candidates)
    setup = plan.objective.setup(params)
    t1 = time.monotonic()
    result = train_model(setup.source, index.train, index.val, len(index.classes), setup.config, extractor=setup.extractor)
    refit_s = time.monotonic() - t1
    test = evaluate(result, setup.extractor, index.test, index.classes)
    trials_done = out.study.get_trials(deepcopy=False)
    per = [t.user_attrs.get("seconds") for t in trials_done if t.user_attrs.get("seconds") is not None]
    return {"val_acc": best.value, "refit_val_acc": result.best.accuracy, "test_acc": test["accuracy"],
            "trials": len(trials_done), "states": {s: sum(t.state.name == s for t in trials_done) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "seconds": seconds, "refit_seconds": refit_s, "mean_trial_s": float(np.mean(per)) if per else None,
            "best_params": params, "best_trial": best.number}


def cache_cost(source, index, cache_dir: Path) -> dict:
    """One 1-epoch trial training the last stage: from cached prefix activations vs from images."""
    out = {}
    for use_cache in (True, False):
        ex = FeatureExtractor(source, cache_dir=cache_dir)
        cfg = TrainConfig(frozen_stages=-1, epochs=1, use_cache=use_cache)
        t0 = time.monotonic()
        r = train_model(source, index.train, index.val, len(index.classes), cfg, extractor=ex)
        out["with_cache_s" if use_cache else "without_cache_s"] = time.monotonic() - t0
        out["with_cache_val_acc" if use_cache else "without_cache_val_acc"] = r.best.accuracy
    out["speedup"] = out["without_cache_s"] / out["with_cache_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds of training per method and data set")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--noise", type=float, nargs="*", default=[0.2, 0.4])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "autotl-bench-search"))
    ap.add_argument("--skip-cache-cost", action="store_true")
    args = ap.parse_args()
    set_torch_threads()
    _console.set_quiet(True)
    data = Path(shared_dataset("cats_vs_dogs") if args.data is None else args.data)
    work = Path(args.work)
    cache_dir = default_cache_dir()
    source = create_source_model(args.model)
    original = scan_dataset(data)
    cut = FeatureExtractor(source).num_stages - 1
    t_start = time.monotonic()

    rows, results = [], {}
    for noise in [0.0, *args.noise]:
        name = f"{data.name}" + (f"-noisy{int(round(noise * 100))}" if noise else "")
        copy_dir = make_copy(data, work / name, noise)
        index = scan_dataset(copy_dir)
        t0 = time.monotonic()
        seed_cache(source, original, index, cache_dir, [cut])
        seeded = time.monotonic() - t0
        res = {
            "linear probe": baseline(source, index, TrainConfig(frozen_stages="all", epochs=15, lr=3e-3), args.budget, cache_dir),
            "fine-tune last stage": baseline(source, index, TrainConfig(frozen_stages=-1, epochs=15, lr=3e-3), args.budget, cache_dir),
            "search (default recipe)": search(index, work / f"run-{name}", args.budget, args.trials, cache_dir, args.model),
        }
        results[name] = {"noise": noise, "n_train": len(index.train), "n_val": len(index.val), "n_test": len(index.test),
                         "cache_seed_s": seeded, "methods": res}
        for method, r in res.items():
            rows.append({"data": name, "method": method, "val acc": r["val_acc"], "test acc": r["test_acc"],
                         "trials": r["trials"], "train s": r["seconds"],
                         "s/trial": r.get("mean_trial_s") or r["seconds"]})
        print_table("search vs baselines (equal budget)", rows, ["data", "method", "val acc", "test acc", "trials", "train s", "s/trial"])

    cost = {} if args.skip_cache_cost else cache_cost(source, scan_dataset(work / data.name), cache_dir)
    if cost:
        print_table("one 1-epoch last-stage trial", [cost], list(cost))
    write_results("search", {"model": args.model, "budget_s": args.budget, "trials": args.trials, "results": results,
                             "table": rows, "cache_cost": cost, "total_s": time.monotonic() - t_start,
                             "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
