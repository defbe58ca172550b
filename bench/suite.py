"""Small-data suite: held-out error of the linear probe, a timm-style full fine-tune and default `autotl fit`.

    nice python bench/suite.py [--tasks cvd20 ...] [--seeds 0 1 2] [--name suite]

Each task is built from ``../shared/data`` (and the Debian package ``dataset-fashion-mnist``) for
each seed: a fresh sample of training images written to a work folder, and a *test* folder of other
images that no method ever sees while it decides anything (training, early stopping, dropout
reference, trial ranking) — it is read once, after the model is exported, to score it.

- ``cvd20`` / ``cvd20-64px``: Cats vs Dogs, 20 training images per class (full size / down-sampled
  to 64 px); one class-per-folder set (autotl cross-validates over all 40).
- ``cvd100-noisy40``: 100 per class in ``train/`` with 40 % of the labels flipped, and a clean
  ``val/`` folder of 20 per class (the user's trusted split).
- ``fmnist20``: Fashion-MNIST, 10 classes × 20 images (28 px greyscale).
- ``imagenette10``: 10-way, 10 images per class of the Imagenette pool (ImageNet classes).

Methods, in the same run and at the same wall-clock budget:
- ``probe``: ``autotl fit --no-search --model tf_efficientnet_lite0`` (the plain linear probe);
- ``autotl``: ``autotl fit DIR`` with no strategy flags: every packaged model ranked, the default
  recipe searched for the automatic time budget, the winner refitted and exported;
- ``finetune``: a plain full fine-tune in the style of timm's ``train.py`` (all layers trainable,
  AdamW lr 1e-3, weight decay 0.05, cosine with warm-up, label smoothing 0.1, timm's train
  augmentation, the best epoch by val top-1 kept as timm's checkpoint saver does), for as many
  epochs (≤ 30) as fit in the wall time the ``autotl`` run took.

"val" is what each method saw of its own validation data (probe / finetune: the val split that
early-stopped them; autotl: the cross-validated estimate of the selected trial); "gap" is val
minus held-out accuracy, in points. JSON goes to ``bench/results/suite.json``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
from PIL import Image

from _common import SHARED_DATA, print_table, write_results

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
TASKS = {
    "cvd20": {"source": "cvd", "per_class": 20, "test_per_class": 100},
    "cvd20-64px": {"source": "cvd", "per_class": 20, "test_per_class": 100, "px": 64},
    "cvd100-noisy40": {"source": "cvd", "per_class": 100, "test_per_class": 100, "noise": 0.4, "clean_val": 20},
    "fmnist20": {"source": "fmnist", "per_class": 20, "test_per_class": 30},
    "imagenette10": {"source": "imagenette", "per_class": 10, "test_per_class": 30},
}
# Tasks the default recipe's portfolio is learned on (bench/portfolio.py): never reported by this suite.
DEV_TASKS = {
    "dev-digits15": {"source": "digits", "per_class": 15, "test_per_class": 30},
    "dev-imagenette5a": {"source": "imagenette", "per_class": 20, "test_per_class": 30, "classes": 5},
    "dev-imagenette5b": {"source": "imagenette", "per_class": 8, "test_per_class": 30, "classes": 5, "offset": 5},
    "dev-cvd50-96px": {"source": "cvd", "per_class": 50, "test_per_class": 100, "px": 96},
    "dev-cvd60-noisy30": {"source": "cvd", "per_class": 60, "test_per_class": 100, "noise": 0.3, "clean_val": 15,
                          "px": 128},
}
FT_MAX_EPOCHS = 30


# ------------------------------------------------------------------------------------------ data
def _class_files(root: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def _write(src, dst: Path, px: int | None) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(src, Image.Image):
        src.save(dst)
    elif px:
        img = Image.open(src).convert("RGB")
        img.thumbnail((px, px), Image.BICUBIC)
        img.save(dst, quality=95)
    else:
        shutil.copyfile(src, dst)


def _fmnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    return images, labels


def _spec(task: str) -> dict:
    return TASKS.get(task) or DEV_TASKS[task]


def available(task: str) -> str | None:
    """None when the task's data is here, else why not."""
    src = _spec(task)["source"]
    if src == "digits":
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            return "scikit-learn is not installed (its bundled digits)"
        return None
    need = {"cvd": SHARED_DATA / "cats_vs_dogs", "imagenette": SHARED_DATA / "imagenette_pool", "fmnist": FMNIST}[src]
    return None if need.exists() else f"{need} is absent"


def build_task(task: str, seed: int, root: Path) -> tuple[Path, Path]:
    """``(data folder, test folder)`` for one seed; the test images are disjoint from the data."""
    spec = _spec(task)
    rng = np.random.default_rng([seed, sum(map(ord, task))])
    data, test = root / "data", root / "test"
    n, n_test, px = spec["per_class"], spec["test_per_class"], spec.get("px")
    if spec["source"] == "fmnist":
        for split, count, out in (("train", n, data), ("test", n_test, test)):
            images, labels = _fmnist(split)
            for c, name in enumerate(FMNIST_CLASSES):
                for i in rng.choice(np.flatnonzero(labels == c), count, replace=False):
                    _write(Image.fromarray(images[i], "L"), out / name / f"{split}{i:05d}.png", None)
        return data, test
    if spec["source"] == "digits":  # scikit-learn's bundled 8x8 digits, upscaled to 32 px greyscale
        from sklearn.datasets import load_digits

        digits = load_digits()
        for c in range(10):
            idx = rng.permutation(np.flatnonzero(digits.target == c))
            for j, i in enumerate(idx[: n + n_test]):
                img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8), "L").resize((32, 32), Image.BICUBIC)
                _write(img, (data if j < n else test) / f"d{c}" / f"{i:05d}.png", None)
        return data, test
    if spec["source"] == "imagenette":
        pool = _class_files(SHARED_DATA / "imagenette_pool")
        names = list(pool)
        if spec.get("classes"):
            names = names[spec.get("offset", 0): spec.get("offset", 0) + spec["classes"]]
        for name in names:
            files = pool[name]
            picked = rng.permutation(len(files))[: n + n_test]
            for j, i in enumerate(picked):
                _write(files[i], (data if j < n else test) / name / files[i].name, px)
        return data, test
    cvd = SHARED_DATA / "cats_vs_dogs"
    train_files, val_files = _class_files(cvd / "train"), _class_files(cvd / "val")
    classes = list(train_files)
    noise, clean_val = spec.get("noise", 0.0), spec.get("clean_val", 0)
    for c, name in enumerate(classes):
        order = rng.permutation(len(train_files[name]))
        for i in order[:n]:
            label = name
            if rng.random() < noise:  # a flipped label (two classes: the other one)
                label = classes[1 - c]
            _write(train_files[name][i], data / ("train" if clean_val else "") / label / train_files[name][i].name, px)
        for i in order[n:n + clean_val]:  # the user's clean val/ folder: other training images, true labels
            _write(train_files[name][i], data / "val" / name / train_files[name][i].name, px)
        for i in rng.permutation(len(val_files[name]))[:n_test]:  # held out: from the other split
            _write(val_files[name][i], test / name / val_files[name][i].name, px)
    return data, test


# ------------------------------------------------------------------------------------------ methods
def held_out_accuracy(model_path: Path, test: Path) -> float:
    """Accuracy of an exported model on the test folder (through onnxruntime, as a user runs it)."""
    from autotl.predict import predict

    res = predict(model_path, test, top_k=1)
    truth = [Path(p["path"]).parent.name for p in res.predictions]
    assert not res.errors and len(truth) > 0
    return float(np.mean([t == p for t, p in zip(truth, res.labels)]))


def run_autotl(data: Path, test: Path, out: Path, seed: int, cache: Path, recipe: str | None = None) -> dict:
    """Default ``autotl fit`` (or with ``recipe``); when it published an ensemble, the same study is
    also refitted without it (``--no-ensemble`` on a copy of the run, no new trials): the ensemble's
    ablation at the cost of one refit, measured on the same held-out images."""
    from autotl.fit import fit

    t0 = time.monotonic()
    res = fit(data, out, seed=seed, cache_dir=cache, recipe=recipe)
    wall = time.monotonic() - t0
    best = res.search["best"]
    ens = res.search.get("ensemble") or {}
    row = {"val": best["value"], "test": held_out_accuracy(res.model_path, test), "wall_s": wall,
           "budget_s": res.search["time_budget_s"], "n_trials": res.search["n_trials"], "model": res.source_model,
           "selected": best["description"], "decide_score": best.get("decide_score"),
           "selection": res.search["selection"]["kind"], "ensemble": ens,
           "search_s": res.search["search_seconds"],
           # the cost model's estimate vs the measured seconds of every trial that ran to the end
           "estimates": [[r["estimated_seconds"], r["seconds"]] for r in res.search["leaderboard"]
                         if r["state"] == "COMPLETE" and r.get("estimated_seconds") is not None],
           "not_started": sum(bool(r.get("not_started")) for r in res.search["leaderboard"])}
    if ens.get("used"):
        single = out.parent / (out.name + "-single")
        shutil.copytree(out, single)
        t1 = time.monotonic()
        res1 = fit(data, single, seed=seed, cache_dir=cache, recipe=recipe, resume=True, ensemble=False,
                   trials=len(res.search["leaderboard"]))
        row["single"] = {"test": held_out_accuracy(res1.model_path, test), "refit_s": time.monotonic() - t1}
    else:
        row["single"] = {"test": row["test"], "refit_s": 0.0}
    return row


def run_probe(data: Path, test: Path, out: Path, seed: int, cache: Path) -> dict:
    from autotl.fit import fit

    t0 = time.monotonic()
    res = fit(data, out, seed=seed, cache_dir=cache, models=["tf_efficientnet_lite0"], search=False)
    return {"val": res.metrics["val"]["accuracy"], "test": held_out_accuracy(res.model_path, test),
            "wall_s": time.monotonic() - t0}


def run_finetune(data: Path, test: Path, seed: int, budget_s: float) -> dict:
    """timm train.py style full fine-tune of Lite0 within ``budget_s`` of wall time."""
    import torch

    from autotl.data import scan_dataset
    from torch.utils.data import DataLoader

    from autotl.features import ImageDataset, eval_transform
    from autotl.models import create_source_model
    from autotl.train import TrainConfig, train_model

    t0 = time.monotonic()
    index = scan_dataset(data, seed=seed)
    test_index = scan_dataset(test, val_fraction=0.5, seed=seed)
    test_samples = test_index.train + test_index.val
    source = create_source_model("tf_efficientnet_lite0")
    cfg = TrainConfig(frozen_stages=0, lr=1e-3, backbone_lr_ratio=1.0, weight_decay=0.05, label_smoothing=0.1,
                      warmup_epochs=1.0, batch_size=16, patience=FT_MAX_EPOCHS + 1, use_cache=False, seed=seed)
    # epochs that fit the budget: time one epoch-sized probe of steps (forward + backward)
    probe_cfg = TrainConfig(**{**cfg.to_dict(), "epochs": 1})
    t_probe = time.monotonic()
    train_model(source, index.train, index.val, len(index.classes), probe_cfg, device="cpu")
    epoch_s = time.monotonic() - t_probe
    left = budget_s - (time.monotonic() - t0)
    cfg.epochs = int(max(1, min(FT_MAX_EPOCHS, left // max(epoch_s, 1e-3))))
    result = train_model(source, index.train, index.val, len(index.classes), cfg, device="cpu",
                         deadline=t0 + budget_s)
    mapping = [index.classes.index(c) for c in test_index.classes]
    samples = [type(s)(s.path, mapping[s.label]) for s in test_samples]
    loader = DataLoader(ImageDataset(samples, eval_transform(source.data_config)), batch_size=32)
    net = result.net.eval()
    with torch.no_grad():
        logits = torch.cat([net.forward_from(x, net.frozen) for x, *_ in loader])
    labels = torch.tensor([s.label for s in samples])
    m = {"accuracy": float((logits.argmax(1) == labels).float().mean())}
    return {"val": result.best.accuracy, "test": m["accuracy"], "wall_s": time.monotonic() - t0, "epochs": cfg.epochs,
            "epochs_run": len(result.history)}


# ------------------------------------------------------------------------------------------ main
def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--name", default="suite", help="results file name (bench/results/NAME.json)")
    parser.add_argument("--recipe", default=None, help="recipe for the autotl runs (an ablation: e.g. bench/recipes/v0.1-default.yaml)")
    parser.add_argument("--no-baselines", action="store_true", help="only the autotl runs (an ablation beside a full suite)")
    parser.add_argument("--rows", type=Path, default=None,
                        help="JSON-lines file of measured (task, seed) rows: rows found there are not run again, and "
                             "every new row is appended as soon as it is measured (an interrupted suite resumes)")
    args = parser.parse_args()

    from autotl import _console
    from autotl.models import set_torch_threads

    _console.set_quiet(True)
    set_torch_threads()
    work = args.work or Path(tempfile.mkdtemp(prefix="autotl-suite-"))
    cache = work / "feature-cache"
    runs, skipped = [], {}
    done = {}
    if args.rows is not None and args.rows.is_file():
        for line in args.rows.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["task"], row["seed"])] = row
    for task in args.tasks:
        why = available(task)
        if why:
            skipped[task] = why
            print(f"skipped {task}: {why}")
            continue
        for seed in args.seeds:
            if (task, seed) in done:
                runs.append(done[(task, seed)])
                continue
            root = work / f"{task}-s{seed}"
            if root.exists():
                shutil.rmtree(root)
            data, test = build_task(task, seed, root)
            row = {"task": task, "seed": seed}
            row["autotl"] = run_autotl(data, test, root / "run-autotl", seed, cache, args.recipe)
            if not args.no_baselines:
                row["probe"] = run_probe(data, test, root / "run-probe", seed, cache)
                row["finetune"] = run_finetune(data, test, seed, row["autotl"]["wall_s"])
            runs.append(row)
            if args.rows is not None:
                with args.rows.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            print(f"{task} seed {seed}: " + ", ".join(
                f"{m} val {row[m]['val']:.3f} test {row[m]['test']:.3f} ({row[m]['wall_s']:.0f}s)"
                for m in ("probe", "finetune", "autotl") if m in row) + f"; autotl chose: {row['autotl']['selected']}"
                + (f"; ensemble of {len(row['autotl']['ensemble'].get('members', []))} (single test "
                   f"{row['autotl']['single']['test']:.3f})" if row["autotl"].get("ensemble", {}).get("used") else ""), flush=True)

    table = []
    for task in [t for t in args.tasks if t not in skipped]:
        rows = [r for r in runs if r["task"] == task]
        line = {"task": task, "seeds": len(rows)}
        if any("single" in r["autotl"] for r in rows):
            line["autotl no-ensemble err %"] = _ms([100 * (1 - r["autotl"].get("single", r["autotl"])["test"]) for r in rows])
            line["ensembles"] = f"{sum(bool(r['autotl'].get('ensemble', {}).get('used')) for r in rows)}/{len(rows)}"
        for m in [m for m in ("probe", "finetune", "autotl") if all(m in r for r in rows)]:
            err = [100 * (1 - r[m]["test"]) for r in rows]
            gap = [100 * (r[m]["val"] - r[m]["test"]) for r in rows]
            line[f"{m} err %"] = _ms(err)
            line[f"{m} gap"] = _ms(gap)
        # autotl's held-out error minus the probe's, in points: < 0 means autotl is better
        if all("probe" in r for r in rows):
            line["autotl − probe err"] = _ms([100 * (r["probe"]["test"] - r["autotl"]["test"]) for r in rows])
        line["autotl s"] = f"{statistics.fmean(r['autotl']['wall_s'] for r in rows):.0f}"
        table.append(line)
    cols = [c for c in ["task", "seeds", "probe err %", "finetune err %", "autotl err %", "autotl no-ensemble err %",
                        "ensembles", "autotl − probe err", "probe gap", "finetune gap", "autotl gap", "autotl s"]
            if any(c in line for line in table)]
    print_table("held-out error (mean ± std over seeds); gap = val − held-out accuracy, points", table, cols)
    optimism = [100 * (r["autotl"]["val"] - r["autotl"]["test"]) for r in runs]
    if optimism:
        print(f"autotl mean val-to-test optimism over all runs: {statistics.fmean(optimism):.2f} points")
    write_results(args.name, {"tasks": {t: TASKS[t] for t in args.tasks}, "seeds": args.seeds, "recipe": args.recipe or "default",
                              "runs": runs,
                              "table": table, "skipped": skipped,
                              "autotl_mean_optimism_points": statistics.fmean(optimism) if optimism else None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
