"""Small-data suite: held-out error of the linear probe, the scikit-learn reference, a timm-style full fine-tune and default `autotl fit`.

    nice python bench/suite.py [--tasks cvd20 ...] [--seeds 0 1 2] [--name suite]
    nice python bench/suite.py --ablate taps        # the same autotl runs with one search dimension off

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
- ``reference``: scikit-learn's ``LogisticRegressionCV`` (C by stratified 5-fold CV on all labelled
  images, refit) on the standardised pooled features of the model ``autotl fit`` ranks first;
- ``autotl``: ``autotl fit DIR`` with no strategy flags: every packaged model ranked, the default
  recipe searched for the automatic time budget, the winner refitted and exported;
- ``finetune``: a plain full fine-tune in the style of timm's ``train.py`` (all layers trainable,
  AdamW lr 1e-3, weight decay 0.05, cosine with warm-up, label smoothing 0.1, timm's train
  augmentation, the best epoch by val top-1 kept as timm's checkpoint saver does), for as many
  epochs (≤ 30) as fit in the wall time the ``autotl`` run took.

"val" is what each method saw of its own validation data (probe / finetune: the val split that
early-stopped them; reference: its best cross-validated C; autotl: the cross-validated score of the
selected trial); "gap" is val minus held-out accuracy, in points. Every autotl run also records its
headline ``estimate`` (the card's: corrected for the choice, with a 95 % interval), what won, its
trials complete / pruned / not started and the share of search time in complete trials. The
development tasks the default recipe's portfolio was learned on (``DEV_TASKS``, bench/portfolio.py)
are never among these. JSON goes to ``bench/results/suite.json`` (``suite-ablate-DIM.json``).
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
import warnings
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


# Each new search dimension switched off in turn (fixed parameters of the default recipe's space;
# "finetune" keeps every trial a probe, "ensemble" publishes the selected trial alone).
ABLATIONS = {
    "backbones": {"fixed": {"backbones": "1"}},
    "taps": {"fixed": {"taps": 0}},
    "flip": {"fixed": {"flip": False}},
    "dropout": {"fixed": {"dropout_tau": None}},
    "finetune": {"fixed": {"frozen_stages": "all"}},
    "ensemble": {"ensemble": False},
}


def _what_won(res) -> dict:
    """The published model in a few fields: which family, features, strategies."""
    params = res.search["best"]["params"]
    training = res.training
    return {"kind": training.get("kind"), "backbones": params.get("backbones"), "taps": params.get("taps"),
            "flip": params.get("flip"), "dropout_tau": params.get("dropout_tau"), "frozen_stages": params.get("frozen_stages"),
            "regularizer": params.get("regularizer"), "ensemble": bool((res.search.get("ensemble") or {}).get("used"))}


def _time_spent(leaderboard: list[dict], search_s: float) -> dict:
    """Trials complete / pruned / not started / failed, and the share of the search's wall time that
    went into trials that completed."""
    states = {"complete": 0, "pruned": 0, "not_started": 0, "fail": 0}
    complete_s = 0.0
    for r in leaderboard:
        if r.get("not_started"):
            states["not_started"] += 1
        elif r["state"] == "COMPLETE":
            states["complete"] += 1
            complete_s += r.get("seconds") or 0.0
        elif r["state"] == "PRUNED":
            states["pruned"] += 1
        elif r["state"] == "FAIL":
            states["fail"] += 1
    return {**states, "complete_seconds": round(complete_s, 2),
            "share_in_complete": round(complete_s / search_s, 4) if search_s > 0 else None}


def run_autotl(data: Path, test: Path, out: Path, seed: int, cache: Path, recipe: str | None = None,
               ablation: str | None = None) -> dict:
    """Default ``autotl fit`` (or with ``recipe``, or with one dimension switched off: ``ablation``)."""
    from autotl.fit import fit

    extra = ABLATIONS[ablation] if ablation else {}
    t0 = time.monotonic()
    res = fit(data, out, seed=seed, cache_dir=cache, recipe=recipe, fixed_params=extra.get("fixed"),
              ensemble=extra.get("ensemble", True))
    wall = time.monotonic() - t0
    best = res.search["best"]
    ens = res.search.get("ensemble") or {}
    return {"val": best["value"], "test": held_out_accuracy(res.model_path, test), "wall_s": wall,
            "budget_s": res.search["time_budget_s"], "n_trials": res.search["n_trials"], "model": res.source_model,
            "selected": best["description"], "won": _what_won(res), "selection": res.search["selection"]["kind"],
            "ensemble": ens, "search_s": res.search["search_seconds"], "estimate": res.estimate,
            "trials": _time_spent(res.search["leaderboard"], res.search["search_seconds"]),
            # the cost model's estimate vs the measured seconds of every trial that ran to the end
            "estimates": [[r["estimated_seconds"], r["seconds"]] for r in res.search["leaderboard"]
                          if r["state"] == "COMPLETE" and r.get("estimated_seconds") is not None]}


def run_reference(data: Path, test: Path, seed: int, cache: Path) -> dict:
    """The scikit-learn reference: logistic regression on the top-ranked model's standardised pooled
    features (all labelled images), C chosen by stratified 5-fold CV (``LogisticRegressionCV``), refit
    on all; ranking as ``autotl fit`` ranks (the packaged models, LogME)."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from autotl.data import scan_dataset
    from autotl.fit import _base_config, score_candidates
    from autotl.options import FitOptions
    from autotl.run import Run

    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="autotl-ref-"))
    try:
        run = Run.open(data, work / "run", seed=seed, cache_dir=cache)
        score_candidates(run, _base_config(run.index, FitOptions(seed=seed)))
        ex = run.extractors[run.labels[0]]
        labelled = list(run.index.train) + list(run.index.val)
        test_index = scan_dataset(test, val_fraction=0.5, seed=seed)
        mapping = [run.index.classes.index(c) for c in test_index.classes]
        test_samples = [type(t)(t.path, mapping[t.label]) for t in test_index.train + test_index.val]
        x, y = ex.extract(labelled).pooled.numpy(), np.array([t.label for t in labelled])
        xt, yt = ex.extract(test_samples).pooled.numpy(), np.array([t.label for t in test_samples])
        folds = int(max(2, min(5, np.bincount(y).min())))
        clf = make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=10, cv=folds, max_iter=5000, random_state=seed))
        with warnings.catch_warnings():  # scikit-learn 1.8's notices of future defaults; the fit is as documented
            warnings.simplefilter("ignore", FutureWarning)
            clf.fit(x, y)
        cv = float(clf[-1].scores_[next(iter(clf[-1].scores_))].mean(0).max())
        return {"val": cv, "test": float((clf.predict(xt) == yt).mean()), "wall_s": time.monotonic() - t0,
                "model": run.labels[0], "C": float(clf[-1].C_[0])}
    finally:
        shutil.rmtree(work, ignore_errors=True)


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


METHODS = ("probe", "reference", "finetune", "autotl")
BASELINES = METHODS[:-1]


def _ablation_delta(runs: list[dict], full: list[dict]) -> dict:
    """Per task, autotl's held-out error with the dimension off minus with it on (points, mean ± std over
    the seeds both ran; > 0 = the dimension pays)."""
    on = {(r["task"], r["seed"]): r["autotl"] for r in full}
    out = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        pairs = [(r["autotl"], on[(task, r["seed"])]) for r in runs if r["task"] == task and (task, r["seed"]) in on]
        if pairs:
            out[task] = {"seeds": len(pairs), "off − on err points": _ms([100 * (b["test"] - a["test"]) for a, b in pairs])}
    return out


def _task_table(tasks: list[str], runs: list[dict]) -> list[dict]:
    table = []
    for task in tasks:
        rows = [r for r in runs if r["task"] == task]
        if not rows:
            continue
        line = {"task": task, "seeds": len(rows)}
        for m in [m for m in METHODS if all(m in r for r in rows)]:
            line[f"{m} err %"] = _ms([100 * (1 - r[m]["test"]) for r in rows])
            line[f"{m} gap"] = _ms([100 * (r[m]["val"] - r[m]["test"]) for r in rows])
        for m in ("probe", "reference"):  # autotl's held-out error minus the other's, in points: < 0 = autotl better
            if all(m in r for r in rows):
                line[f"autotl − {m} err"] = _ms([100 * (r[m]["test"] - r["autotl"]["test"]) for r in rows])
        line["estimate gap"] = _ms([100 * (r["autotl"]["estimate"]["accuracy"] - r["autotl"]["test"]) for r in rows])
        line["in interval"] = f"{sum(r['autotl']['estimate']['low'] <= r['autotl']['test'] <= r['autotl']['estimate']['high'] for r in rows)}/{len(rows)}"
        line["autotl s"] = f"{statistics.fmean(r['autotl']['wall_s'] for r in rows):.0f}"
        line["complete share"] = f"{statistics.fmean(r['autotl']['trials']['share_in_complete'] or 0 for r in rows):.2f}"
        table.append(line)
    return table


def _summary(runs: list[dict]) -> dict:
    """The issue's bars over all runs: relative error cut vs the probe, optimism, estimate calibration,
    time in complete trials, budget kept."""
    out: dict = {}
    if not runs:
        return out
    err = {m: statistics.fmean(1 - r[m]["test"] for r in runs) for m in METHODS if all(m in r for r in runs)}
    out["mean_test_error"] = {m: round(100 * v, 2) for m, v in err.items()}
    partial = {m: [r for r in runs if m in r] for m in METHODS if m not in err and any(m in r for r in runs)}
    if partial:  # a baseline run on some rows only: its mean and autotl's on the same rows
        out["mean_test_error_on_rows_run"] = {m: {"rows": len(rs), m: round(100 * statistics.fmean(1 - r[m]["test"] for r in rs), 2),
                                                  "autotl": round(100 * statistics.fmean(1 - r["autotl"]["test"] for r in rs), 2)}
                                              for m, rs in partial.items()}
    if "probe" in err and err["probe"] > 0:
        out["autotl_relative_error_cut_vs_probe"] = round(1 - err["autotl"] / err["probe"], 4)
    out["autotl_mean_optimism_points"] = round(statistics.fmean(100 * (r["autotl"]["val"] - r["autotl"]["test"]) for r in runs), 2)
    out["estimate_mean_gap_points"] = round(statistics.fmean(
        100 * (r["autotl"]["estimate"]["accuracy"] - r["autotl"]["test"]) for r in runs), 2)
    out["estimate_mean_abs_gap_points"] = round(statistics.fmean(
        100 * abs(r["autotl"]["estimate"]["accuracy"] - r["autotl"]["test"]) for r in runs), 2)
    out["estimate_coverage"] = round(statistics.fmean(
        float(r["autotl"]["estimate"]["low"] <= r["autotl"]["test"] <= r["autotl"]["estimate"]["high"]) for r in runs), 3)
    out["share_of_search_in_complete_trials"] = round(statistics.fmean(
        r["autotl"]["trials"]["share_in_complete"] or 0 for r in runs), 3)
    out["search_within_budget"] = all(r["autotl"]["search_s"] <= (r["autotl"]["budget_s"] or 1e9) + 1.0 for r in runs)
    won: dict[str, int] = {}
    for r in runs:
        w = r["autotl"]["won"]
        for key, on in (("several backbones", "+" in str(w.get("backbones") or "")), ("taps", bool(w.get("taps"))),
                        ("flip", bool(w.get("flip"))), ("dropout", w.get("dropout_tau") is not None),
                        ("fine-tune", w.get("frozen_stages") not in (None, "all")), ("ensemble", w.get("ensemble"))):
            won[key] = won.get(key, 0) + int(bool(on))
    out["dimension_won_in_runs"] = won
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--name", default=None, help="results file name (bench/results/NAME.json; default suite or "
                                                      "suite-ablate-DIM)")
    parser.add_argument("--recipe", default=None, help="recipe for the autotl runs")
    parser.add_argument("--ablate", default=None, choices=list(ABLATIONS),
                        help="switch this search dimension off (autotl runs only, no baselines)")
    parser.add_argument("--no-baselines", action="store_true", help="only the autotl runs")
    parser.add_argument("--baselines", nargs="+", default=list(BASELINES), choices=list(BASELINES),
                        help="which baselines to run beside autotl (default: all; the fine-tune gets autotl's wall time)")
    parser.add_argument("--against", type=Path, default=None,
                        help="with --ablate: a full suite's results JSON; prints autotl's held-out error with the "
                             "dimension off minus on, per task, on the seeds both ran")
    parser.add_argument("--rows", type=Path, default=None,
                        help="JSON-lines file of measured (task, seed) rows: rows found there are not run again (a row "
                             "that lacks a baseline asked for runs that baseline only), and every new or completed row "
                             "is appended as soon as it is measured (an interrupted suite resumes; the last line wins)")
    args = parser.parse_args()
    name = args.name or ("suite" + (f"-ablate-{args.ablate}" if args.ablate else ""))
    baselines = () if (args.no_baselines or args.ablate) else tuple(args.baselines)

    from autotl import _console
    from autotl.models import set_torch_threads

    from _common import load_average

    _console.set_quiet(True)
    set_torch_threads()
    load_start = load_average()
    if load_start[0] > 2.5:
        print(f"warning: load average {load_start[0]} > 2.5 on this machine: timings and budgets are not figures")
    work = args.work or Path(tempfile.mkdtemp(prefix="autotl-suite-"))
    cache = work / "feature-cache"
    runs, skipped, done = [], {}, {}
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
            root = work / f"{task}-s{seed}"
            row = done.get((task, seed))
            if row is not None and all(b in row for b in baselines):
                runs.append(row)
                continue
            if root.exists():
                shutil.rmtree(root)
            data, test = build_task(task, seed, root)
            if row is None:
                row = {"task": task, "seed": seed, "load_before": load_average()}
                row["autotl"] = run_autotl(data, test, root / "run-autotl", seed, cache, args.recipe, args.ablate)
            else:  # a measured row that lacks a baseline asked for now: only that baseline runs
                row["load_before_" + "_".join(b for b in baselines if b not in row)] = load_average()
            if "probe" in baselines and "probe" not in row:
                row["probe"] = run_probe(data, test, root / "run-probe", seed, cache)
            if "reference" in baselines and "reference" not in row:
                row["reference"] = run_reference(data, test, seed, cache)
            if "finetune" in baselines and "finetune" not in row:
                row["finetune"] = run_finetune(data, test, seed, row["autotl"]["wall_s"])
            runs.append(row)
            if args.rows is not None:
                with args.rows.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            a = row["autotl"]
            print(f"{task} seed {seed}: " + ", ".join(
                f"{m} val {row[m]['val']:.3f} test {row[m]['test']:.3f} ({row[m]['wall_s']:.0f}s)"
                for m in METHODS if m in row) + f"; estimate {a['estimate']['accuracy']:.3f} "
                f"[{a['estimate']['low']:.3f}, {a['estimate']['high']:.3f}]; autotl chose: {a['selected']}", flush=True)

    table = _task_table([t for t in args.tasks if t not in skipped], runs)
    cols = [c for c in ["task", "seeds", "probe err %", "reference err %", "finetune err %", "autotl err %",
                        "autotl − probe err", "autotl − reference err", "autotl gap", "estimate gap", "in interval",
                        "complete share", "autotl s"] if any(c in line for line in table)]
    print_table("held-out error (mean ± std over seeds); gap = val − held-out accuracy, points", table, cols)
    summary = _summary(runs)
    if args.against is not None:
        summary["ablation_vs_full"] = _ablation_delta(runs, json.loads(args.against.read_text())["runs"])
    for k, v in summary.items():
        print(f"{k}: {v}")
    estimates = [{"task": r["task"], "seed": r["seed"], "estimate": r["autotl"]["estimate"]["accuracy"],
                  "low": r["autotl"]["estimate"]["low"], "high": r["autotl"]["estimate"]["high"],
                  "held_out": r["autotl"]["test"], "cv_raw": r["autotl"]["val"]} for r in runs]
    write_results(name, {"tasks": {t: TASKS[t] for t in args.tasks}, "seeds": args.seeds, "recipe": args.recipe or "default",
                         "ablation": args.ablate, "load_average_at_start": load_start, "runs": runs, "table": table,
                         "summary": summary, "estimates": estimates, "skipped": skipped})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
