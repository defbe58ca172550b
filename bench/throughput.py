"""Frozen computation at the machine's speed, int8 export and streamed predict, in one run.

Everything is measured in this one process (children for the fits), on the same images, with the
compared methods alternated batch by batch or run by run, so that a machine shared with other jobs
shifts all of them alike; each figure is the mean ± std over the repetitions.

1. frozen forward (EfficientNet-Lite0, 224 px, batch 32, pre-decoded Cats vs Dogs photos): PyTorch
   eager vs eager channels_last vs the chosen backend (``autotl.backend``), img/s and ratios;
2. end-to-end extraction (``FeatureExtractor.extract``: decode in worker processes + the backend),
   img/s against the bare eager forward loop of 1.;
3. scoring wall time (``score_models``) of Lite0/1/2 on the same training images, before (eager)
   and after (the chosen backend; its first-run graph export included);
4. ``autotl predict`` (``Predictor.predict_paths``, decode included) against a bare onnxruntime
   session loop over the same images pre-decoded at the same batch size, and a streamed
   ``autotl predict --csv`` over 10,000+ photos in a child process (its peak RSS);
5. int8 vs fp32 (size, latency, validation accuracy) from the cards of two ``fit --quantize int8``
   runs: Cats vs Dogs and a Fashion-MNIST task;
6. peak RSS and wall time of ``autotl fit <cats_vs_dogs> --no-search --quantize int8`` (a child);
7. a cold-cache ``autotl fit`` with a search (800 Cats vs Dogs photos, 400 a class, ``--time-budget 1m``)
   in a child: its wall time, the time outside the search (wall − the study's seconds), the phases
   from its card, its peak RSS, and the median complete probe trial (frozen backbone) from its
   leaderboard.json;
8. end-to-end extraction on large JPEGs (3-12 megapixels, made by upscaling shared photos into a
   temporary folder): ``FeatureExtractor.extract`` (draft decoding, decode workers, the backend),
   the same with draft decoding off, and a bare eager loop decoding the same files (Pillow full
   decode + timm eval transform + eager forward, batch 32); img/s and ratios.

Sections run in the order above (7 first: nothing else is in its child's peak); ``--only`` picks
some. The JSON is written after every section, with the load average measured before it (a
warning is printed above 2.5: the figures of a loaded machine are not figures).

    PYTHONPATH=. nice python bench/throughput.py            # all of it (~25 min on 2 quiet cores)
    PYTHONPATH=. nice python bench/throughput.py --quick    # fewer repetitions and images
    PYTHONPATH=. nice python bench/throughput.py --only fit,large-jpeg
    PYTHONPATH=. nice python bench/throughput.py --only fit,large-jpeg --fit-images 40 --fit-budget 10s \
        --large-images 4 --name throughput-tiny             # does it work (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np
import torch

from _common import ROOT, SHARED_DATA, load_average, print_table, shared_dataset, write_results

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
MODELS = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
BATCH = 32
SECTIONS = ("fit", "int8", "frozen", "scoring", "predict", "stream", "large-jpeg")
BUSY_LOAD = 2.5  # a 1-minute load average above this on 2 cores: other jobs are in the figures
# (width, height) of the large JPEGs, cycled: 12, 8 and 3 megapixels, landscape and portrait
LARGE_SIZES = ((4000, 3000), (2448, 3264), (2048, 1536), (3000, 4000))


def _ms(values) -> dict:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": int(len(a))}


def _fmt(d: dict, digits: int = 1) -> str:
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _cvd_files(split: str, n: int) -> list:
    from autotl.data import Sample

    root = shared_dataset("cats_vs_dogs") / split
    per = {c: sorted((root / c).iterdir()) for c in sorted(os.listdir(root))}
    out = []
    for i in range(max(len(v) for v in per.values())):  # interleave the classes
        for label, files in enumerate(per.values()):
            if i < len(files):
                out.append(Sample(files[i], label))
    return out[:n]


# --------------------------------------------------------------------------------------- 1 + 2
def frozen_forward(reps: int, n_images: int, tmp: Path) -> dict:
    from autotl import backend
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model

    source = create_source_model("tf_efficientnet_lite0")
    samples = _cvd_files("val", n_images)
    ex = FeatureExtractor(source, cache_dir=tmp / "cache", batch_size=64)
    batches = [torch.stack([ex.transform(_rgb(s.path)) for s in samples[i:i + BATCH]]) for i in range(0, len(samples), BATCH)]
    model = source.model.eval()
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    classifier = model.get_classifier()
    t0 = time.perf_counter()
    ort = backend.frozen_forward([m for _, m in ex.stages], ex.pool, classifier, [], backend=ex.backend,
                                 device=torch.device("cpu"), input_size=source.data_config["input_size"],
                                 label=source.label, weights_id=source.weights_id, graph_dir=tmp / "cache" / "graphs")
    export_s = time.perf_counter() - t0

    methods = {
        "eager": lambda x: model(x),
        "eager channels_last": lambda x: model_cl(x.contiguous(memory_format=torch.channels_last)),
        f"backend ({ort.name})": lambda x: ort(x),
    }
    with torch.no_grad():
        for f in methods.values():
            f(batches[0])  # warm-up
        per_rep = {m: [] for m in methods}
        for _ in range(reps):
            spent = {m: 0.0 for m in methods}
            for b in batches:  # alternate the methods batch by batch
                for m, f in methods.items():
                    t = time.perf_counter()
                    f(b)
                    spent[m] += time.perf_counter() - t
            for m in methods:
                per_rep[m].append(len(samples) / spent[m])
    eager = np.asarray(per_rep["eager"])
    rows = [{"method": m, "img/s": _fmt(_ms(v)), "x eager": _fmt(_ms(np.asarray(v) / eager), 2)} for m, v in per_rep.items()]

    # 2: end-to-end extraction (decode in workers + backend), cache cleared between runs, graph kept
    e2e = {"onnxruntime": [], "eager": []}
    extractors = {"onnxruntime": ex, "eager": FeatureExtractor(source, cache_dir=tmp / "cache", batch_size=64, backend="eager")}
    for _ in range(max(2, reps // 2)):
        for name, extractor in extractors.items():
            key = extractor._key(samples)
            shutil.rmtree(tmp / "cache" / key, ignore_errors=True)
            extractor._memory.clear()
            t = time.perf_counter()
            extractor.extract(samples, description="bench")
            e2e[name].append(len(samples) / (time.perf_counter() - t))
    bare_eager = float(eager.mean())
    rows += [{"method": f"end-to-end extract ({k}, decode incl.)", "img/s": _fmt(_ms(v)),
              "x eager": f"{np.mean(v) / bare_eager:.2f} (vs the bare eager loop)"} for k, v in e2e.items()]
    print_table(f"1-2. frozen forward, Lite0 224 px, batch {BATCH}, {len(samples)} Cats vs Dogs photos, {reps} reps, "
                f"{torch.get_num_threads()} threads", rows, ["method", "img/s", "x eager"])
    return {"n_images": len(samples), "reps": reps, "graph_export_s": export_s,
            "img_per_s": {m: _ms(v) for m, v in per_rep.items()},
            "ratio_backend_vs_eager": _ms(np.asarray(per_rep[f"backend ({ort.name})"]) / eager),
            "ratio_channels_last_vs_eager": _ms(np.asarray(per_rep["eager channels_last"]) / eager),
            "end_to_end_img_per_s": {k: _ms(v) for k, v in e2e.items()},
            "ratio_end_to_end_vs_bare_eager": float(np.mean(e2e["onnxruntime"]) / bare_eager), "rows": rows}


def _rgb(path):
    from autotl._images import load_rgb

    return load_rgb(path)


# --------------------------------------------------------------------------------------- 3
def scoring(n_images: int, tmp: Path) -> dict:
    from autotl.data import scan_dataset
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model
    from autotl.score import score_models
    from autotl.fit import _stratified_sample

    index = scan_dataset(shared_dataset("cats_vs_dogs"), verify=False)
    index.train = _stratified_sample(index.train, n_images, 0)
    rows, out = [], {}
    for name in MODELS:
        source = create_source_model(name)
        secs = {}
        # before (eager), after on a first run (graph export included), after with the graph cached;
        # every run with an empty feature cache
        for what, backend in (("eager", "eager"), ("first", "onnxruntime"), ("cached", "onnxruntime")):
            cache = tmp / f"score-{name}-{backend}"
            if what == "cached":
                for entry in cache.iterdir():
                    if entry.name != "graphs":
                        shutil.rmtree(entry)
            ex = FeatureExtractor(source, cache_dir=cache, backend=backend)
            t = time.perf_counter()
            score_models(index, [source], run_dir=tmp / f"score-run-{name}-{what}", extractors=[ex])
            secs[what] = time.perf_counter() - t
        out[name] = {"before_eager_s": secs["eager"], "after_first_run_s": secs["first"], "after_graph_cached_s": secs["cached"],
                     "speedup_first_run": secs["eager"] / secs["first"], "speedup_graph_cached": secs["eager"] / secs["cached"]}
        rows.append({"model": name, "before (eager) s": secs["eager"], "after, first run (export incl.) s": secs["first"],
                     "after, graph cached s": secs["cached"], "speed-up first": secs["eager"] / secs["first"],
                     "speed-up cached": secs["eager"] / secs["cached"]})
    print_table(f"3. scoring wall time, {len(index.train)} Cats vs Dogs training images", rows, list(rows[0]))
    return {"n_images": len(index.train), "models": out}


# --------------------------------------------------------------------------------------- 4
def predict_vs_bare(model_path: Path, reps: int, n_images: int) -> dict:
    import onnxruntime as ort

    from autotl.predict import Predictor, preprocess_batch

    files = [s.path for s in _cvd_files("val", n_images)]
    predictor = Predictor(model_path)
    pre = predictor.preprocessing
    batches = [preprocess_batch([_rgb(f) for f in files[i:i + BATCH]], pre) for i in range(0, len(files), BATCH)]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    bare = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    name = bare.get_inputs()[0].name
    bare.run(None, {name: batches[0]})
    predictor.predict_paths(files[:BATCH], batch_size=BATCH, keep=0)  # warm-up
    got = {"bare session": [], "autotl predict": []}
    for _ in range(reps):  # alternate run by run
        t = time.perf_counter()
        for b in batches:
            bare.run(None, {name: b})
        got["bare session"].append(len(files) / (time.perf_counter() - t))
        t = time.perf_counter()
        res = predictor.predict_paths(files, batch_size=BATCH, keep=0)
        got["autotl predict"].append(len(files) / (time.perf_counter() - t))
        assert res.n_images == len(files)
    ratio = np.asarray(got["autotl predict"]) / np.asarray(got["bare session"])
    rows = [{"what": k, "img/s": _fmt(_ms(v))} for k, v in got.items()] + [{"what": "ratio predict / bare", "img/s": _fmt(_ms(ratio), 3)}]
    print_table(f"4. predict vs bare onnxruntime session, {len(files)} photos, batch {BATCH}, {reps} alternating reps "
                f"({model_path.name})", rows, ["what", "img/s"])
    return {"n_images": len(files), "reps": reps, "img_per_s": {k: _ms(v) for k, v in got.items()}, "ratio": _ms(ratio)}


def streamed_predict(model_path: Path, tmp: Path, n_images: int) -> dict:
    """``autotl predict MODEL FOLDER --csv`` in a child over ``n_images`` photos (Cats vs Dogs + the Imagenette pool)."""
    folder = tmp / "stream"
    sources = [*sorted((SHARED_DATA / "cats_vs_dogs").rglob("*.jpg")), *sorted((SHARED_DATA / "imagenette_pool").rglob("*.jpg"))]
    sources = sources[:n_images]
    for i, src in enumerate(sources):
        dst = folder / f"{i // 1000:02d}" / f"{i:05d}{src.suffix.lower()}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(src, dst)
    csv = tmp / "stream.csv"
    cmd = [sys.executable, "-m", "autotl.cli", "predict", str(model_path), str(folder), "--csv", str(csv)]
    peak, secs, code = _run_child(cmd)
    rows = sum(1 for _ in open(csv)) - 1 if csv.is_file() else 0
    print_table(f"4b. streamed `autotl predict --csv` over {len(sources)} photos (child process)",
                [{"images": len(sources), "csv rows": rows, "seconds": secs, "img/s": len(sources) / secs,
                  "peak RSS MB (largest process)": peak["max_process_mb"], "peak RSS MB (process tree)": peak["tree_mb"],
                  "exit": code}], ["images", "csv rows", "seconds", "img/s", "peak RSS MB (largest process)",
                                   "peak RSS MB (process tree)", "exit"])
    return {"n_images": len(sources), "csv_rows": rows, "seconds": secs, "img_per_s": len(sources) / secs, "exit": code, **peak}


# --------------------------------------------------------------------------------------- 5 + 6
def _tree_rss_mb(root: int) -> float:
    """Sum of VmRSS over ``root`` and its descendants (shared pages of forked workers count twice: an upper bound)."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parents[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier += kids
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next((int(l.split()[1]) for l in fh if l.startswith("VmRSS:")), 0)
        except OSError:
            pass
    return total / 1024


def _run_child(cmd: list[str], env: dict | None = None) -> tuple[dict, float, int]:
    """Run ``cmd``; (peak RSS: the largest single process, by ``/usr/bin/time``, and the polled
    process-tree sum), seconds, exit code. (The rusage of a child forked straight from this big
    process would count this process's pages at the fork; ``time`` forks small.)"""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], env={**os.environ, **(env or {})},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tree_peak = [0.0]
        done = threading.Event()

        def poll():
            while not done.wait(0.5):
                tree_peak[0] = max(tree_peak[0], _tree_rss_mb(proc.pid))

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        err = proc.stderr.read()
        proc.wait()
        done.set()
        watcher.join()
        secs = time.perf_counter() - t
        if proc.returncode:
            print(err[-3000:], file=sys.stderr)
        lines = [l for l in open(rss.name).read().split() if l.isdigit()]
    return ({"max_process_mb": int(lines[-1]) / 1024 if lines else None, "tree_mb": tree_peak[0]}, secs, proc.returncode)


def fit_child(data: Path, out: Path, cache: Path, extra: list[str], env: dict | None = None) -> dict:
    cmd = [sys.executable, "-m", "autotl.cli", "fit", str(data), "--out", str(out), "--no-search", "--quantize", "int8",
           "--cache-dir", str(cache), *extra]
    peak, secs, code = _run_child(cmd, env)
    card = json.loads((out / "model.json").read_text()) if (out / "model.json").is_file() else {}
    return {"command": " ".join(cmd[1:]), "seconds": secs, "exit": code, **peak, "card_int8": card.get("extra", {}).get("int8"),
            "source_model": card.get("source_model", {}).get("name"), "val_accuracy": card.get("metrics", {}).get("val", {}).get("accuracy")}


def _fmnist_task(root: Path, per_class: int, val_per_class: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(14)
    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    for c, name in enumerate(FMNIST_CLASSES):
        picked = rng.choice(np.flatnonzero(labels == c), per_class + val_per_class, replace=False)
        for j, i in enumerate(picked):
            split = "train" if j < per_class else "val"
            (root / split / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(root / split / name / f"{i:05d}.png")
    return root


def int8_rows(fits: dict) -> list[dict]:
    rows = []
    for task, f in fits.items():
        q = f.get("card_int8") or {}
        for kind in ("fp32", "int8"):
            m = q.get(kind) or {}
            rows.append({"task": task, "model": f"{f.get('source_model')} {kind}", "MB": (m.get("size_bytes") or 0) / 1e6,
                         "ms/img (batch 8)": m.get("latency_ms_per_image"), "val acc": m.get("val_accuracy"),
                         "int8 / fp32 size": (q["int8"]["size_bytes"] / q["fp32"]["size_bytes"]) if kind == "int8" and q.get("int8") else "",
                         "drop (points)": q.get("drop_points") if kind == "int8" else "", "kept": q.get("kept") if kind == "int8" else ""})
    return rows


# --------------------------------------------------------------------------------------- 7
def _class_subset(root: Path, per_class: int) -> Path:
    """``per_class`` photos of each class of Cats vs Dogs' training split, copied into ``root``."""
    src = shared_dataset("cats_vs_dogs") / "train"
    for c in sorted(os.listdir(src)):
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / c).iterdir())[:per_class]:
            shutil.copy2(f, root / c / f.name)
    return root


def search_fit(tmp: Path, n_images: int, budget: str) -> dict:
    """``autotl fit DATA --time-budget BUDGET`` with an empty feature cache, in a child process."""
    data = _class_subset(tmp / "search-data", n_images // 2)
    out, cache = tmp / "run-search", tmp / "search-cache"
    cmd = [sys.executable, "-m", "autotl.cli", "fit", str(data), "--out", str(out), "--time-budget", budget,
           "--cache-dir", str(cache)]
    peak, secs, code = _run_child(cmd)
    card = json.loads((out / "model.json").read_text()) if (out / "model.json").is_file() else {}
    extra = card.get("extra") or {}
    search = extra.get("search") or {}
    phases = extra.get("phases") or {}
    board = json.loads((out / "leaderboard.json").read_text()) if (out / "leaderboard.json").is_file() else []
    done = [r for r in board if r.get("state") == "COMPLETE" and r.get("seconds") is not None]
    probes = [r["seconds"] for r in done if r.get("frozen") is not None and r.get("frozen") == r.get("num_stages")]
    search_s = search.get("search_seconds")
    res = {"command": " ".join(cmd[1:]), "n_images": n_images, "time_budget": budget, "exit": code,
           "wall_s": secs, "card_wall_s": extra.get("wall_seconds"), "search_s": search_s,
           "outside_search_s": secs - search_s if search_s is not None else None, "phases": phases,
           "phase_peak_rss_mb": extra.get("phase_peak_rss_mb"), "peak_rss_phase": extra.get("peak_rss_phase"),
           "n_trials": search.get("n_trials"), "n_complete": len(done),
           "median_complete_probe_trial_s": float(np.median(probes)) if probes else None, "n_probe_trials": len(probes),
           "median_complete_trial_s": float(np.median([r["seconds"] for r in done])) if done else None,
           "peak_rss_mb": peak["max_process_mb"], "peak_rss_tree_mb": peak["tree_mb"],
           "val_accuracy": (card.get("metrics") or {}).get("val", {}).get("accuracy"),
           "source_model": (card.get("source_model") or {}).get("name"),
           # every trial: its seconds beside its estimate, and the frozen batches it ran itself (a view
           # or taps no earlier pass computed)
           "trials": [{k: r.get(k) for k in ("number", "state", "seconds", "estimated_seconds", "forward_batches",
                                              "not_started", "params")} for r in board]}
    print_table(f"7. cold-cache `autotl fit` on {n_images} Cats vs Dogs photos, --time-budget {budget} (child process)",
                [{"wall s": secs, "search s": search_s, "outside search s": res["outside_search_s"],
                  "median probe trial s": res["median_complete_probe_trial_s"], "trials (complete)":
                  f"{res['n_trials']} ({len(done)})", "peak RSS MB": peak["max_process_mb"], "exit": code}],
                ["wall s", "search s", "outside search s", "median probe trial s", "trials (complete)", "peak RSS MB", "exit"])
    if phases:
        marks = extra.get("phase_peak_rss_mb") or {}
        print_table(f"7b. its phases (from the card); the peak was reached in: {extra.get('peak_rss_phase')}",
                    [{"phase": k, "seconds": float(v), "peak RSS MB at its end": marks.get(k)} for k, v in phases.items()],
                    ["phase", "seconds", "peak RSS MB at its end"])
    return res


# --------------------------------------------------------------------------------------- 8
def _large_jpegs(folder: Path, n: int) -> list:
    """``n`` JPEGs of 3-12 megapixels (quality 90): shared photos upscaled (bicubic), classes interleaved."""
    from PIL import Image

    from autotl.data import Sample

    out = []
    for i, s in enumerate(_cvd_files("val", n)):
        size = LARGE_SIZES[i % len(LARGE_SIZES)]
        dst = folder / f"{i:04d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(s.path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(dst, quality=90)
        out.append(Sample(dst, s.label))
    return out


def large_jpeg(tmp: Path, n_images: int, reps: int) -> dict:
    """Extraction on large JPEGs: autotl's extractor (draft on / off) vs a bare eager loop over the same files."""
    from PIL import Image

    from autotl import features
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model

    samples = _large_jpegs(tmp / "large-jpeg", n_images)
    megapixels = float(np.mean([np.prod(Image.open(s.path).size) / 1e6 for s in samples]))
    source = create_source_model("tf_efficientnet_lite0")
    model = source.model.eval()
    cache = tmp / "large-cache"
    ex = FeatureExtractor(source, cache_dir=cache)
    ex.extract(samples[:2], description="warm-up")  # exports the frozen graph once; every rep reuses it

    def extract(draft: bool) -> float:
        shutil.rmtree(cache / ex._key(samples), ignore_errors=True)
        ex._memory.clear()
        real = features.decode_min_side
        if not draft:  # (ImageDataset reads the rule when it is made, in this process)
            features.decode_min_side = lambda transform: None
        try:
            t = time.perf_counter()
            ex.extract(samples, description="large JPEGs")
            return len(samples) / (time.perf_counter() - t)
        finally:
            features.decode_min_side = real

    def bare() -> float:
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(samples), BATCH):
                x = torch.stack([ex.transform(Image.open(s.path).convert("RGB")) for s in samples[i:i + BATCH]])
                model(x)
        return len(samples) / (time.perf_counter() - t)

    got = {"autotl extract (draft decode)": [], "autotl extract (draft off)": [], "bare eager loop (full decode)": []}
    for _ in range(reps):  # alternate run by run
        got["autotl extract (draft decode)"].append(extract(True))
        got["autotl extract (draft off)"].append(extract(False))
        got["bare eager loop (full decode)"].append(bare())
    base = np.asarray(got["bare eager loop (full decode)"])
    rows = [{"method": k, "img/s": _fmt(_ms(v), 2), "x bare": _fmt(_ms(np.asarray(v) / base), 2)} for k, v in got.items()]
    print_table(f"8. end-to-end extraction, {len(samples)} large JPEGs ({megapixels:.1f} MP on average), Lite0, "
                f"{reps} alternating reps, {torch.get_num_threads()} threads", rows, ["method", "img/s", "x bare"])
    return {"n_images": len(samples), "mean_megapixels": megapixels, "reps": reps,
            "decode_workers": features.decode_workers(torch.device("cpu")), "img_per_s": {k: _ms(v) for k, v in got.items()},
            "ratio_extract_vs_bare": _ms(np.asarray(got["autotl extract (draft decode)"]) / base),
            "ratio_extract_no_draft_vs_bare": _ms(np.asarray(got["autotl extract (draft off)"]) / base), "rows": rows}


def _before(section: str, results: dict) -> None:
    """Record the load average before ``section``; warn when the machine is busy."""
    load = load_average()
    results.setdefault("load_average_before", {})[section] = load
    if load and load[0] > BUSY_LOAD:
        print(f"WARNING: load average {load[0]:.2f} > {BUSY_LOAD} before section {section!r}: other jobs share the "
              "machine, its timings are not figures", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and images (a busy machine)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections: {', '.join(SECTIONS)}")
    ap.add_argument("--skip-fits", action="store_true", help="leave out the fits (sections fit and int8)")
    ap.add_argument("--skip-stream", action="store_true", help="leave out the streamed predict")
    ap.add_argument("--stream-images", type=int, default=10000)
    ap.add_argument("--fit-images", type=int, default=800, help="photos of the searched fit (half a class)")
    ap.add_argument("--fit-budget", default="1m", help="--time-budget of the searched fit")
    ap.add_argument("--large-images", type=int, default=64, help="large JPEGs of section large-jpeg")
    ap.add_argument("--name", default="throughput")
    args = ap.parse_args()
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        ap.error(f"--only {','.join(unknown)}: not a section (one of {', '.join(SECTIONS)})")
    skip = ({"fit", "int8"} if args.skip_fits else set()) | ({"stream"} if args.skip_stream else set())
    wanted = [s for s in SECTIONS if s in only and s not in skip]
    reps = 3 if args.quick else 5
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    results: dict = {"note": "the machine is shared with other jobs; compare ratios within this run, not across runs",
                     "cores": len(os.sched_getaffinity(0)), "args": vars(args), "sections": wanted}
    with tempfile.TemporaryDirectory(prefix="autotl-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model = None
        for section in wanted:
            _before(section, results)
            if section == "fit":
                results["search_fit"] = search_fit(tmp, args.fit_images, args.fit_budget)
            elif section == "int8":
                model = _int8_fits(tmp, results, args.quick)
            elif section == "frozen":
                results["frozen_forward"] = frozen_forward(reps, 128 if args.quick else 256, tmp)
            elif section == "scoring":
                results["scoring"] = scoring(200 if args.quick else 400, tmp)
            elif section == "predict":
                if model is None or not model.is_file():  # without the fits: a Lite0 classifier exported here
                    model = _lite0_model(tmp)
                results["predict"] = predict_vs_bare(model, 3, 256 if args.quick else 500)
            elif section == "stream":
                # the stream through the Lite0 model (the Fashion-MNIST fit's, when there is one): 2-3x faster than Lite2
                stream_model = next((m for m in (tmp / "run-fmnist" / "model.onnx", model) if m is not None and m.is_file()),
                                    None) or _lite0_model(tmp)
                results["stream"] = streamed_predict(stream_model, tmp, args.stream_images)
            elif section == "large-jpeg":
                results["large_jpeg"] = large_jpeg(tmp, args.large_images, 2 if args.quick else 3)
            write_results(args.name, results)  # after every section: a late failure loses nothing


def _int8_fits(tmp: Path, results: dict, quick: bool) -> Path:
    """Sections 5 and 6: the int8 fits (Cats vs Dogs, and Fashion-MNIST when installed); the Cats vs Dogs model."""
    fits = {"cats_vs_dogs": fit_child(shared_dataset("cats_vs_dogs"), tmp / "run-cvd", tmp / "fit-cache", [])}
    f = fits["cats_vs_dogs"]
    print_table("6. `autotl fit cats_vs_dogs --no-search --quantize int8` (child process, cold cache)",
                [{"seconds": f["seconds"], "peak RSS MB (largest process)": f["max_process_mb"],
                  "peak RSS MB (process tree, upper bound)": f["tree_mb"], "model": f["source_model"],
                  "val acc": f["val_accuracy"], "exit": f["exit"]}],
                ["seconds", "peak RSS MB (largest process)", "peak RSS MB (process tree, upper bound)", "model", "val acc", "exit"])
    if FMNIST.is_dir():
        data = _fmnist_task(tmp / "fmnist", 100 if not quick else 40, 50 if not quick else 20)
        fits["fashion_mnist"] = fit_child(data, tmp / "run-fmnist", tmp / "fit-cache", ["--model", "tf_efficientnet_lite0"])
    results["fit"] = fits
    rows = int8_rows(fits)
    print_table("5. int8 vs fp32 (from the fits' cards; latency on one batch of 8 val images)", rows, list(rows[0]))
    results["int8"] = rows
    return tmp / "run-cvd" / "model.onnx"


def _lite0_model(tmp: Path) -> Path:
    """A two-class classifier on the Lite0 backbone (random head), exported and carded as a fit would."""
    from autotl.card import ModelCard, file_sha256
    from autotl.export import export_onnx
    from autotl.models import create_source_model

    source = create_source_model("tf_efficientnet_lite0")
    torch.manual_seed(0)
    source.model.reset_classifier(2)
    folder = tmp / "lite0-model"
    path = export_onnx(source.model.eval(), folder / "model.onnx", input_size=tuple(source.data_config["input_size"]))
    ModelCard(classes=["cat", "dog"], preprocessing=dict(source.data_config), model_sha256=file_sha256(path)).save(folder / "model.json")
    return path


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
