"""The whole search measured on a CUDA GPU, in one command that fits a short lease; ``--smoke`` runs it on a CPU.

    python bench/gpu.py                       # CUDA machine: under 8 minutes, writes bench/results/gpu.json
    python bench/gpu.py --smoke --out X.json  # CPU, tiny random model, generated images (a test runs this)

Steps, each in a child process with its own time box (killed with its decoders when it overruns); the
JSON is rewritten after every step, and a step writes what it has measured as it goes, so a kill or
an overrun keeps everything measured until then:

1. ``tests``: ``tests/test_device.py``'s CUDA cases (the device resolution, and the autocast, memory
   format and frozen-pass assertions on the real GPU; the rest runs in CI);
2. ``features``: the frozen pass (decode + forward) of Lite0/1/2 through ``FeatureExtractor``,
   images/s on CUDA (the device policy: bf16, channels_last, batches sized from free memory) and on
   the CPU (onnxruntime) in the same run, plus the CUDA forward alone on pre-decoded batches (what
   the GPU could take if decoding kept up);
3. ``finetune``: a full fine-tune of Lite0 on decoded, augmented images, AMP (bf16) on and off:
   images/s of the second epoch, GPU utilisation sampled during it (NVML, else ``nvidia-smi``),
   peak GPU memory;
4. ``search``: a default ``fit`` (scoring, search, refit, export) on a Cats vs Dogs subset
   (200 images per class for training, 50 for validation) with a budget that leaves room for full
   fine-tunes and L2-SP/KD/DTNH trials: wall time, trials by kind, the cost model's estimates
   against the measured trial times;
5. ``export``: the published model's ONNX parity (from its card), its accuracy through
   ``autotl.predict`` on the validation images, CPU latency.

Nothing is downloaded. Data: ``--data``, else ``cats_vs_dogs`` under ``../shared/data``,
``shared/data`` or ``.gpu/data`` (relative to the repository root); without it the search and export
steps are skipped and the throughput steps use generated images. Weights: the packaged Lite models
that are installed, random weights for the others (the same speed; the JSON says which).
``bench/gpu_prepare.sh`` stages what a machine without a package index needs into ``.gpu/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "gpu.json"
DATA_PLACES = [ROOT.parent / "shared" / "data", ROOT / "shared" / "data", ROOT / ".gpu" / "data"]
LITE = [f"tf_efficientnet_lite{i}" for i in range(3)]
STEPS = ("tests", "features", "finetune", "search", "export")

# Scale of each step: on a GPU the whole run stays under 8 minutes (leaves room for a second run in
# a 15-minute lease); ``--smoke`` runs every step in seconds on a CPU.
SCALES = {
    "cuda": {"boxes": {"tests": 90, "features": 110, "finetune": 110, "search": 230, "export": 40}, "deadline": 470,
             "feature_images": 2048, "cpu_feature_images": 256, "forward_batch": 256, "forward_repeats": 10,
             "finetune_images": 6144, "finetune_batch": 64, "train_per_class": 200, "val_per_class": 50,
             "budget": 120, "trials": None, "search_batch": 64, "tests_k": "cuda and not like"},
    "smoke": {"boxes": {"tests": 120, "features": 90, "finetune": 90, "search": 180, "export": 60}, "deadline": 600,
              "feature_images": 16, "cpu_feature_images": 16, "forward_batch": 8, "forward_repeats": 2,
              "finetune_images": 8, "finetune_batch": 4, "train_per_class": 8, "val_per_class": 3,
              # a budget that keeps the probe baseline on a loaded machine; three trials at most
              "budget": 20, "trials": 3, "search_batch": 8, "tests_k": "test_autocast_context"},
}
SMOKE_MODEL = "test_efficientnet@64=random"


# ------------------------------------------------------------------------------------------ utilisation
class UtilSampler:
    """GPU utilisation (%) sampled every ``interval`` s between ``start`` and ``stop``: NVML
    (``pynvml``) when importable, else ``nvidia-smi -lms`` in a subprocess, else nothing."""

    def __init__(self, index: int = 0, interval: float = 0.2, use_nvml: bool = True):
        self.index, self.interval, self.use_nvml = index, interval, use_nvml
        self.samples: list[float] = []
        self.source = "none"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> "UtilSampler":
        self.samples.clear()
        self._stop.clear()
        if self.use_nvml and self._start_nvml():
            return self
        exe = shutil.which("nvidia-smi")
        if exe:
            self.source = "nvidia-smi"
            self._proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           f"--loop-ms={int(self.interval * 1000)}", f"--id={self.index}"],
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
            self._thread.start()
        return self

    def _start_nvml(self) -> bool:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.index)
        except Exception:  # noqa: BLE001 - no NVML here: the nvidia-smi fallback
            return False
        self.source = "nvml"

        def loop():
            while not self._stop.wait(self.interval):
                self.samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return True

    def _read_smi(self) -> None:
        for line in self._proc.stdout:
            value = line.strip().rstrip("%").strip()
            try:
                self.samples.append(float(value))
            except ValueError:  # a header or a message, not a figure
                continue

    def stop(self) -> dict:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
        s = list(self.samples)
        return {"source": self.source, "samples": len(s), "mean": round(statistics.fmean(s), 1) if s else None,
                "median": statistics.median(s) if s else None, "min": min(s) if s else None}


# ------------------------------------------------------------------------------------------ the parent
def _commit() -> dict:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                               text=True, timeout=10)
        if sha.returncode == 0:
            return {"commit": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    # a copy of the working tree without .git (a lent GPU machine): the commit written beside it, if any
    stamp = ROOT / ".gpu" / "COMMIT"
    return {"commit": stamp.read_text().strip() if stamp.is_file() else os.environ.get("AUTOTL_COMMIT", "unknown"),
            "dirty": None}


def _machine(mode: str) -> dict:
    import torch

    from autotl.device import cpu_cores

    d = {"python": platform.python_version(), "torch": torch.__version__, "cores": cpu_cores(),
         "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        d.update(name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                 memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported(),
                 multiprocessors=props.multi_processor_count)
    else:
        d["name"] = f"cpu ({platform.processor() or platform.machine()})" + (" — smoke run" if mode == "smoke" else "")
    return d


def find_data(given: str | None) -> Path | None:
    if given:
        return Path(given)
    for base in DATA_PLACES:
        if (base / "cats_vs_dogs" / "train").is_dir():
            return base / "cats_vs_dogs"
    return None


def _subset(src: Path, dst: Path, train_per_class: int, val_per_class: int) -> Path:
    """``train/`` and ``val/`` with the first n files of each class (copied: a scan of links is not
    the scan of a user's folder)."""
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for cls in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            out = dst / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for f in sorted((src / split / cls).iterdir())[:n]:
                shutil.copy2(f, out / f.name)
    return dst


def _write(path: Path, doc: dict) -> None:
    from autotl._io import atomic_write_json

    atomic_write_json(path, doc)


def _run_step(name: str, config: dict, box: float, work: Path) -> dict:
    """Run one step in a child process (its own session, so an overrun kills its decoders too)."""
    result_file = work / f"{name}.json"
    result_file.unlink(missing_ok=True)
    cfg_file = work / f"{name}.config.json"
    cfg_file.write_text(json.dumps(config))
    t0 = time.monotonic()
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--step", name, "--config", str(cfg_file),
                             "--result", str(result_file)], cwd=ROOT, env=env, start_new_session=True)
    status = "ok"
    try:
        rc = proc.wait(timeout=max(1.0, box))
        if rc != 0:
            status = f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {box:.0f}s"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    out = json.loads(result_file.read_text()) if result_file.is_file() else {}
    inner = out.pop("_status", None)  # the step's own verdict (e.g. failing tests) when it ran to its end
    if status == "ok" and inner:
        status = inner
    return {"status": status, "seconds": round(time.monotonic() - t0, 1), "box_s": round(box), **out}


def main_parent(args) -> int:
    mode = "smoke" if args.smoke else "cuda"
    scale = SCALES[mode]
    out = Path(args.out) if args.out else RESULT
    if mode == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("no CUDA device here: run `python bench/gpu.py --smoke` on a CPU (or give this a GPU)")
    started = time.monotonic()
    deadline = float(args.deadline or scale["deadline"])
    doc = {"bench": "gpu", "mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S"), **_commit(),
           "loadavg": list(os.getloadavg()), "machine": _machine(mode), "steps": {}}
    _write(out, doc)
    with tempfile.TemporaryDirectory(prefix="autotl-gpu-bench-") as tmp:
        work = Path(tmp)
        data = find_data(args.data) if mode == "cuda" else None
        if mode == "smoke":
            from autotl.demo import make_demo_dataset

            gen = make_demo_dataset(work / "gen", per_class=scale["train_per_class"] + scale["val_per_class"], size=64)
            data = work / "smoke-data"
            n_train = scale["train_per_class"]
            for split, sl in (("train", slice(0, n_train)), ("val", slice(n_train, None))):
                for cls in sorted(p.name for p in gen.iterdir()):
                    (data / split / cls).mkdir(parents=True, exist_ok=True)
                    for f in sorted((gen / cls).iterdir())[sl]:
                        shutil.copy2(f, data / split / cls / f.name)
            images = "generated"
        elif data is not None and (data / "train").is_dir():
            data = _subset(data, work / "cats_vs_dogs", scale["train_per_class"], scale["val_per_class"])
            images = f"cats_vs_dogs subset ({scale['train_per_class']}/{scale['val_per_class']} per class)"
        else:
            from autotl.demo import make_demo_dataset

            gen = make_demo_dataset(work / "gen", per_class=100, size=256)
            data, images = None, f"generated (no cats_vs_dogs under {', '.join(str(p) for p in DATA_PLACES)})"
            doc["images_for_throughput"] = str(gen)
        doc["data"] = images
        config = {"mode": mode, "scale": {k: v for k, v in scale.items() if k != "boxes"}, "work": str(work),
                  "data": str(data) if data is not None else None, "generated": doc.get("images_for_throughput"),
                  "run_dir": None}
        for name in STEPS:
            if args.only and name not in args.only:
                continue
            left = deadline - (time.monotonic() - started)
            if name in ("search", "export") and config["data"] is None:
                doc["steps"][name] = {"status": "skipped: no data (give --data or put cats_vs_dogs in ../shared/data)"}
            elif name == "export" and not config["run_dir"]:
                doc["steps"][name] = {"status": "skipped: the search published no model"}
            elif left < 10:
                doc["steps"][name] = {"status": f"skipped: the run's {deadline:.0f}s deadline is reached"}
            else:
                print(f"--- {name} (box {min(scale['boxes'][name], left):.0f}s)", file=sys.stderr, flush=True)
                doc["steps"][name] = _run_step(name, config, min(scale["boxes"][name], left), work)
                if name == "search":
                    config["run_dir"] = doc["steps"][name].get("run_dir")
            doc["seconds"] = round(time.monotonic() - started, 1)
            _write(out, doc)
    doc["summary"] = summary(doc)
    _write(out, doc)
    print(json.dumps(doc["summary"], indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if all(str(s.get("status", "")).startswith(("ok", "skipped")) for s in doc["steps"].values()) else 1


def summary(doc: dict) -> dict:
    """The figures the GPU note reports, one line each."""
    s = doc["steps"]
    out: dict = {"device": doc["machine"].get("name"), "seconds": doc.get("seconds"),
                 "steps": {k: v.get("status") for k, v in s.items()}}
    for row in s.get("features", {}).get("models", []):
        out[f"features {row['model']} img/s (accelerated / cpu)"] = [row.get("accelerated_img_s"), row.get("cpu_img_s")]
    ft = s.get("finetune", {}).get("runs", {})
    if ft:
        out["finetune img/s (amp / fp32)"] = [ft.get("amp", {}).get("img_s"), ft.get("fp32", {}).get("img_s")]
        out["finetune gpu utilisation % (amp)"] = ft.get("amp", {}).get("utilisation", {}).get("mean")
        out["finetune peak MiB (amp / fp32)"] = [ft.get("amp", {}).get("peak_mib"), ft.get("fp32", {}).get("peak_mib")]
    if "search" in s:
        out["search wall s"] = s["search"].get("wall_s")
        out["search trials"] = s["search"].get("trials")
    if "export" in s:
        out["parity"] = s["export"].get("parity")
    return out


# ------------------------------------------------------------------------------------------ the steps
def _policy(cfg: dict):
    """The run's policy: the GPU's own, or CUDA's settings on the CPU for the smoke run."""
    from autotl.device import resolve_policy

    if cfg["mode"] == "smoke":
        return resolve_policy("cpu", settings_for="cuda", cores=3)
    return resolve_policy("cuda")


def _models(cfg: dict) -> list[str]:
    if cfg["mode"] == "smoke":
        return [SMOKE_MODEL]
    from autotl.models import list_packaged_models

    packaged = set(list_packaged_models())
    return [m if m in packaged else f"{m}=random" for m in LITE]


def _samples(cfg: dict, split: str, n: int) -> list:
    """``n`` samples of ``split`` (repeated when there are fewer images: throughput, not accuracy)."""
    from autotl.data import scan_dataset

    root = Path(cfg["data"] or cfg["generated"])
    index = scan_dataset(root, val_fraction=0.2, seed=0)
    pool = list(getattr(index, split)) or list(index.train)
    return [pool[i % len(pool)] for i in range(n)], index


def step_tests(cfg: dict, result: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"]
    if cfg["scale"]["tests_k"]:
        cmd += ["-k", cfg["scale"]["tests_k"]]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return {"_status": "ok" if proc.returncode == 0 else f"failed (pytest exit {proc.returncode})",
            "command": " ".join(cmd[1:]), "summary": lines[-1] if lines else "",
            "wall_s": round(time.monotonic() - t0, 1),
            "failures": [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]}


def step_features(cfg: dict, result: Path) -> dict:
    import torch

    from autotl.backend import frozen_forward
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model

    sc, policy = cfg["scale"], _policy(cfg)
    rows = []
    doc = {"policy": policy.describe(), "models": rows}
    samples, _ = _samples(cfg, "train", sc["feature_images"])
    cpu_samples = samples[:sc["cpu_feature_images"]]
    for spec in _models(cfg):
        source = create_source_model(spec)
        row = {"model": spec, "weights": source.weights_origin, "input_size": list(source.data_config["input_size"]),
               "images": len(samples), "cpu_images": len(cpu_samples)}
        rows.append(row)
        fast = FeatureExtractor(source, device=policy, cache_dir=None, batch_size=64)
        warm = samples[:min(64, len(samples) // 2)]  # another list than the timed one: no cache hit
        fast.extract(warm, description="warm-up")  # context, kernels, autotuning, workers
        fast.forward_batches = 0
        t0 = time.perf_counter()
        fast.extract(samples, description="accelerated pass")
        policy.synchronize()
        row["accelerated_img_s"] = round(len(samples) / (time.perf_counter() - t0), 1)
        row["accelerated_backend"] = fast.backend
        row["accelerated_batch"] = -(-len(samples) // max(1, fast.forward_batches))
        # the forward alone on pre-decoded batches: the GPU's rate when decoding keeps up
        runner = frozen_forward([m for _, m in fast.stages], fast.pool, None, [], backend=fast.backend, device=policy,
                                input_size=source.data_config["input_size"], label=source.label,
                                weights_id=source.weights_id, graph_dir=None)
        x = torch.randn(sc["forward_batch"], *source.data_config["input_size"])
        if policy.pin_memory:
            x = x.pin_memory()
        runner(x)
        policy.synchronize()
        t0 = time.perf_counter()
        for _ in range(sc["forward_repeats"]):
            runner(x)
        policy.synchronize()
        row["forward_only_img_s"] = round(sc["forward_batch"] * sc["forward_repeats"] / (time.perf_counter() - t0), 1)
        runner.close()
        if policy.is_cuda:
            torch.cuda.empty_cache()
        cpu = FeatureExtractor(source, device="cpu", cache_dir=Path(cfg["work"]) / "cpu-cache", batch_size=64)
        cpu.extract(cpu_samples[:min(16, len(cpu_samples) // 2)], description="cpu warm-up")  # the graph's export
        t0 = time.perf_counter()
        cpu.extract(cpu_samples, description="cpu pass")
        row["cpu_img_s"] = round(len(cpu_samples) / (time.perf_counter() - t0), 1)
        row["cpu_backend"] = cpu.backend
        row["speed-up"] = round(row["accelerated_img_s"] / row["cpu_img_s"], 2)
        _partial(result, doc)
    return doc


def step_finetune(cfg: dict, result: Path) -> dict:
    import numpy as np
    import torch

    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model
    from autotl.train import TrainConfig, train_model

    sc, policy = cfg["scale"], _policy(cfg)
    spec = _models(cfg)[0]
    source = create_source_model(spec)
    train, index = _samples(cfg, "train", sc["finetune_images"])
    val, _ = _samples(cfg, "val", min(64, sc["finetune_images"]))
    runs: dict = {}
    doc = {"model": spec, "weights": source.weights_origin, "images": len(train), "batch": sc["finetune_batch"],
           "frozen_stages": 0, "runs": runs}
    for name, pol in (("amp", policy), ("fp32", dataclasses.replace(policy, amp_dtype=None))):
        sampler = UtilSampler() if pol.is_cuda else None
        marks: dict = {}

        def on_epoch(m, marks=marks, sampler=sampler, pol=pol):
            if m.epoch == 0:  # the second epoch is the steady one: workers up, kernels tuned
                if pol.is_cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                if sampler is not None:
                    sampler.start()
            elif m.epoch == 1 and sampler is not None:
                marks["utilisation"] = sampler.stop()

        cfg_t = TrainConfig(frozen_stages=0, epochs=2, batch_size=sc["finetune_batch"], lr=1e-3, warmup_epochs=0,
                            use_cache=False, early_stopping=False)
        ex = FeatureExtractor(source, device=pol, cache_dir=None)
        res = train_model(source, train, val, len(index.classes), cfg_t, extractor=ex, device=pol, on_epoch=on_epoch)
        run = {"policy": pol.describe(), "epoch_s": [round(h.seconds, 2) for h in res.history],
               "img_s": round(len(train) / res.history[-1].seconds, 1),
               "finite_loss": bool(all(np.isfinite(h.train_loss) for h in res.history)),
               "utilisation": marks.get("utilisation", {"source": "none (not a GPU)"})}
        if pol.is_cuda:
            run["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            u = run["utilisation"].get("mean")
            run["utilisation_at_least_70"] = u is not None and u >= 70
        runs[name] = run
        _partial(result, doc)
    if runs.get("fp32", {}).get("img_s"):
        doc["amp_speed-up"] = round(runs["amp"]["img_s"] / runs["fp32"]["img_s"], 2)
    return doc


def step_search(cfg: dict, result: Path) -> dict:
    from autotl.fit import fit

    sc, policy = cfg["scale"], _policy(cfg)
    # the packaged candidates (what a default fit searches); one random-weight Lite0 when none is installed
    models = [m for m in _models(cfg) if "=random" not in m] or _models(cfg)[:1]
    doc = {"models": models, "budget_s": sc["budget"], "policy": policy.describe()}
    _partial(result, doc)
    t0 = time.monotonic()
    res = fit(cfg["data"], Path(cfg["work"]) / "run", models=models, time_budget=sc["budget"], trials=sc["trials"],
              device=policy, cache_dir=Path(cfg["work"]) / "cache", seed=0, batch_size=sc["search_batch"])
    doc["wall_s"] = round(time.monotonic() - t0, 1)
    doc["run_dir"] = str(res.run_dir)
    search = res.search or {}
    rows = search.get("leaderboard") or []
    kinds: dict = {}
    for r in rows:
        p, frozen, n = r.get("params") or {}, r.get("frozen"), r.get("num_stages")
        if frozen is not None and n is not None and frozen >= n:
            what = "probe"
        else:
            what = "full fine-tune" if frozen == 0 else "partial fine-tune"
        reg = p.get("regularizer", "none")
        key = what + ("" if reg == "none" else f" + {reg}") + (" + dtnh" if p.get("dtnh") else "")
        kinds[key] = kinds.get(key, 0) + 1
    timed = [(r["estimated_seconds"], r["seconds"]) for r in rows
             if r.get("estimated_seconds") and r.get("seconds") and r.get("state") == "COMPLETE"]
    doc.update(trials=len(rows), states=search.get("states"), kinds=kinds, search_s=search.get("search_seconds"),
               stopped_by=search.get("stopped_by"), mean_trial_s=search.get("mean_trial_seconds"),
               estimate_over_measured=round(statistics.median(e / s for e, s in timed), 2) if timed else None,
               best=(search.get("best") or {}).get("description"), metrics=res.metrics, source=res.source_model,
               weights=res.weights_origin, parity=res.parity)
    return doc


def step_export(cfg: dict, result: Path) -> dict:
    import numpy as np
    from PIL import Image

    from autotl.data import scan_dataset
    from autotl.predict import Predictor

    run_dir = Path(cfg["run_dir"])
    card = json.loads((run_dir / "model.json").read_text())
    pred = Predictor(run_dir / "model.onnx")
    index = scan_dataset(cfg["data"], val_fraction=0.2, seed=0)
    val = list(index.val)
    names = index.classes
    correct = 0
    for i in range(0, len(val), 32):
        batch = val[i:i + 32]
        probs = pred.predict_proba([Image.open(s.path).convert("RGB") for s in batch])
        correct += sum(pred.classes[int(j)] == names[s.label] for j, s in zip(probs.argmax(1), batch))
    one = [Image.open(val[0].path).convert("RGB")]
    pred.predict_proba(one)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        pred.predict_proba(one)
        times.append(time.perf_counter() - t0)
    return {"parity": card.get("parity"), "onnx_mb": round((run_dir / "model.onnx").stat().st_size / 2**20, 2),
            "onnx_val_accuracy": round(correct / max(1, len(val)), 4), "val_images": len(val),
            "card_metrics": card.get("metrics"), "cpu_latency_ms": round(1000 * float(np.median(times)), 2)}


def _partial(result: Path, doc: dict) -> None:
    """What the step has measured so far (kept when the step is killed)."""
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, default=str))
    os.replace(tmp, result)


def main_step(args) -> int:
    cfg = json.loads(Path(args.config).read_text())
    from autotl.device import set_torch_threads

    set_torch_threads()
    result = Path(args.result)
    doc = globals()[f"step_{args.step}"](cfg, result)
    _partial(result, doc)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny random model, generated images (seconds)")
    ap.add_argument("--out", help=f"result JSON (default {RESULT.relative_to(ROOT)})")
    ap.add_argument("--data", help="a cats_vs_dogs folder (train/ and val/ of class folders)")
    ap.add_argument("--deadline", type=float, help="seconds for the whole run (default 470 on a GPU)")
    ap.add_argument("--only", nargs="+", choices=STEPS, help="run only these steps")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    return main_step(args) if args.step else main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
