"""``bench/gpu.py``: the script a GPU lease runs, kept from rotting by running it here at smoke scale."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_smoke_run_measures_every_step(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "smoke" and doc["commit"] and len(doc["loadavg"]) == 3 and doc["machine"]["name"]
    steps = doc["steps"]
    assert {k: v["status"] for k, v in steps.items()} == {k: "ok" for k in ("tests", "features", "finetune", "search",
                                                                          "export")}
    assert "passed" in steps["tests"]["summary"] and not steps["tests"]["failures"]
    (row,) = steps["features"]["models"]
    assert row["accelerated_backend"] == "cpu-bf16" and row["cpu_backend"] == "onnxruntime"
    assert row["accelerated_img_s"] > 0 and row["cpu_img_s"] > 0 and row["forward_only_img_s"] > 0
    runs = steps["finetune"]["runs"]
    assert runs["amp"]["policy"]["amp_dtype"] == "bf16" and runs["fp32"]["policy"]["amp_dtype"] == "fp32"
    assert all(r["img_s"] > 0 and r["finite_loss"] and len(r["epoch_s"]) == 2 for r in runs.values())
    search = steps["search"]
    assert search["trials"] >= 1 and search["policy"]["channels_last"] and search["parity"]["passed"]
    assert sum(search["kinds"].values()) == search["trials"]
    export = steps["export"]
    assert export["parity"]["passed"] and 0.0 <= export["onnx_val_accuracy"] <= 1.0 and export["val_images"] > 0
    assert doc["summary"]["steps"] == {k: "ok" for k in steps}


def test_utilisation_falls_back_to_nvidia_smi(tmp_path, monkeypatch):
    """Without NVML the sampler reads ``nvidia-smi``'s loop output (headers and units skipped)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    args_file = tmp_path / "args"
    fake = bin_dir / "nvidia-smi"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {args_file}\necho 'utilization.gpu [%]'\necho '35 %'\necho 70\n"
                    "exec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sampler = _bench().UtilSampler(use_nvml=False).start()
    deadline = time.monotonic() + 20
    while len(sampler.samples) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = sampler.stop()
    assert stats["source"] == "nvidia-smi" and stats["samples"] == 2 and stats["mean"] == 52.5 and stats["min"] == 35
    assert "--query-gpu=utilization.gpu" in args_file.read_text()


def test_no_gpu_means_no_utilisation(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    stats = _bench().UtilSampler(use_nvml=False).start().stop()
    assert stats == {"source": "none", "samples": 0, "mean": None, "median": None, "min": None}


def test_an_overrunning_step_is_killed_with_its_children_and_keeps_its_partial_result(tmp_path, monkeypatch):
    bench = _bench()
    pid_file = tmp_path / "child.pid"
    fake = tmp_path / "python"
    # stands in for the step's interpreter: writes a partial result, starts a decoder-like child, hangs
    fake.write_text("#!/bin/sh\nfor a; do result=$a; done\n"
                    "echo '{\"models\": [{\"model\": \"m\", \"accelerated_img_s\": 5.0}]}' > $result\n"
                    f"sleep 300 & echo $! > {pid_file}\nexec sleep 300\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bench.sys, "executable", str(fake))
    out = bench._run_step("features", {"mode": "smoke"}, 3.0, tmp_path)
    assert out["status"] == "timed out after 3s" and out["models"] == [{"model": "m", "accelerated_img_s": 5.0}]
    child = int(pid_file.read_text())
    for _ in range(100):  # the kill reaches the step's whole process group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{child}/stat").is_file() and Path(f"/proc/{child}/stat").read_text().split()[2] == "Z":
            break  # killed, waiting to be reaped by init
        time.sleep(0.05)
    else:
        pytest.fail("the step's child outlived the kill")


def test_the_search_data_is_a_per_class_subset(tmp_path, make_image_folder):
    bench = _bench()
    src = make_image_folder(tmp_path / "cvd", {"cat": [5, 3], "dog": [4, 3]}, splits=["train", "val"])
    assert bench.find_data(None) in (None, *[p / "cats_vs_dogs" for p in bench.DATA_PLACES])
    assert bench.find_data(str(src)) == src
    sub = bench._subset(src, tmp_path / "sub", 2, 1)
    counts = {(p.parent.parent.name, p.parent.name) for p in sub.rglob("*.png")}
    assert counts == {("train", "cat"), ("train", "dog"), ("val", "cat"), ("val", "dog")}
    assert len(list((sub / "train" / "cat").iterdir())) == 2 and len(list((sub / "val" / "dog").iterdir())) == 1


def test_the_full_run_needs_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit, match="--smoke"):
        _bench().main([])
