"""Baseline on Cats vs Dogs with EfficientNet-Lite0: linear probe vs fine-tuning the last stage(s),
and feature-extraction throughput relative to a bare ``forward_features`` loop in the same run.

    python bench/baseline.py [--data ../shared/data/cats_vs_dogs] [--throughput-images 256]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import print_table, shared_dataset, write_results
from autotl.data import scan_dataset
from autotl.features import FeatureExtractor, ImageDataset
from autotl.fit import default_cache_dir
from autotl.models import create_source_model, set_torch_threads
from autotl.train import TrainConfig, train_model


def throughput(source, samples, batch_size: int) -> dict:
    """Images/s of our extractor (no cache) vs a bare decode + transform + forward_features loop."""
    ex = FeatureExtractor(source, cache_dir=None, batch_size=batch_size)
    ds = ImageDataset(samples, ex.transform)
    model = source.model.eval()
    with torch.no_grad():  # warm-up both paths
        model.forward_features(torch.stack([ds[i][0] for i in range(min(4, len(ds)))]))
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            model.forward_features(torch.stack([ds[j][0] for j in range(i, min(i + batch_size, len(ds)))]))
    bare = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex.extract(samples, [])  # pooled features + source logits, as fit computes them
    ours = time.perf_counter() - t0
    return {"images": len(samples), "bare_forward_features_s": bare, "extractor_s": ours,
            "bare_img_per_s": len(samples) / bare, "extractor_img_per_s": len(samples) / ours, "ratio": bare / ours}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default=None)
    ap.add_argument("--model", default="tf_efficientnet_lite0")
    ap.add_argument("--throughput-images", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    set_torch_threads()
    data = shared_dataset("cats_vs_dogs") if args.data is None else args.data
    index = scan_dataset(data)
    source = create_source_model(args.model)

    tp = throughput(source, index.train[: args.throughput_images], batch_size=64)

    ex = FeatureExtractor(source, cache_dir=default_cache_dir())
    t0 = time.perf_counter()
    ex.extract(index.train, [])
    ex.extract(index.val, [])
    pooled_s = time.perf_counter() - t0
    rows = []
    for name, frozen in [("linear probe (cached features)", "all"), ("fine-tune head stage", -1), ("fine-tune last 2 stages", -2)]:
        t0 = time.perf_counter()
        cut_before = ex.forward_batches
        if frozen != "all":
            ex.extract(index.train, [ex.num_stages + frozen])
            ex.extract(index.val, [ex.num_stages + frozen])
        extract_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = train_model(source, index.train, index.val, len(index.classes),
                        TrainConfig(frozen_stages=frozen, epochs=args.epochs), extractor=ex)
        rows.append({"strategy": name, "frozen_stages": r.net.frozen, "val_accuracy": r.best.accuracy,
                     "val_macro_f1": r.best.macro_f1, "epochs_run": len(r.history), "train_s": time.perf_counter() - t0,
                     "prefix_extract_s": extract_s + (pooled_s if frozen == "all" else 0.0),
                     "backbone_batches": ex.forward_batches - cut_before, "s_per_epoch": r.seconds / len(r.history)})
    print_table(f"Cats vs Dogs, {source.label} ({len(index.train)} train / {len(index.val)} val)", rows,
                ["strategy", "frozen_stages", "val_accuracy", "epochs_run", "train_s", "s_per_epoch", "prefix_extract_s"])
    print_table("feature extraction throughput", [tp],
                ["images", "bare_img_per_s", "extractor_img_per_s", "ratio"])
    write_results("baseline", {"data": str(data), "model": source.label, "weights": source.weights_origin,
                               "n_train": len(index.train), "n_val": len(index.val), "strategies": rows, "throughput": tp})


if __name__ == "__main__":
    main()
