"""Fault matrix: Ctrl-C in every phase, SIGKILL, OOM/NaN trials, disk full, a data fuzzer.

Rows covered elsewhere (not repeated here): Ctrl-C during a trial → tests/test_search.py
(test_keyboard_interrupt_then_resume, test_cli_interrupt_resume_and_json); data changed between
--resume runs → tests/test_search.py::test_resume_refused_when_data_changed; non-finite training loss
→ tests/test_search.py::test_failing_trial_does_not_end_the_study; export interrupted at the file level
→ tests/test_export.py::test_interrupted_export_keeps_previous_model.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

import optuna  # noqa: E402
import torch  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from PIL import Image  # noqa: E402

import autotl.features  # noqa: E402
import autotl.train  # noqa: E402
from autotl.cli import main  # noqa: E402
from autotl.data import scan_dataset  # noqa: E402
from autotl.errors import AutotlError  # noqa: E402
from autotl.run import Run  # noqa: E402
from autotl.search._distributed import interrupted_numbers, is_interrupted  # noqa: E402
from autotl.search import SearchOptions, parse_recipe, plan_search, plan_selection  # noqa: E402
from autotl.train import TrainConfig  # noqa: E402

MODEL = "test_efficientnet=random"
ROOT = Path(__file__).resolve().parents[1]
RECIPE = ("trials: 2\nsampler: {n_startup_trials: 2}\npruner: {type: none}\n"
          "space:\n  frozen_stages: [all, -1]\n  lr: {low: 0.001, high: 0.03, log: true}\n  epochs: 1\n")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", {"cat": 8, "dog": 8}, splits=["train", "val"], size=(40, 32))


def _args(data: Path, tmp_path: Path, trials: int, *extra: str, recipe_text: str = RECIPE) -> list[str]:
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(recipe_text)
    return ["fit", str(data), "--out", str(tmp_path / "run"), "--model", MODEL, "--recipe", str(recipe),
            "--trials", str(trials), "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--cv-folds", "2", *extra]


def _no_tmp(*dirs: Path) -> None:
    left = [p for d in dirs if d.exists() for p in d.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"half-written files left: {left}"


def _study(tmp_path: Path):
    return optuna.load_study(study_name="autotl", storage=f"sqlite:///{(tmp_path / 'run' / 'study.db').resolve()}")


# ----------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_feature_extraction_then_rerun(data, tmp_path, monkeypatch, capsys):
    # the pass writes its arrays straight into .npy files: cut the second one off half-way through its header
    real_header, calls = np.lib.format.write_array_header_1_0, []

    def header_then_interrupt(fh, d):
        calls.append(1)
        if len(calls) == 2:
            fh.write(b"\x93NUMPY half")
            raise KeyboardInterrupt
        return real_header(fh, d)

    monkeypatch.setattr(autotl.features.np.lib.format, "write_array_header_1_0", header_then_interrupt)
    assert main(_args(data, tmp_path, 2)) == 130
    assert len(calls) == 2, "the interrupt came during the feature pass"
    _no_tmp(tmp_path / "run", tmp_path / "cache")
    assert not (tmp_path / "run" / "model.onnx").exists()
    monkeypatch.setattr(autotl.features.np.lib.format, "write_array_header_1_0", real_header)
    capsys.readouterr()
    assert main(_args(data, tmp_path, 2, "--json")) == 0  # the same command again: nothing was lost but time
    doc = json.loads(capsys.readouterr().out)
    assert doc["search"]["states"] == {"complete": 2} and Path(doc["model_path"]).is_file()
    _no_tmp(tmp_path / "run", tmp_path / "cache")


def test_ctrl_c_or_disk_full_during_export_keeps_previous_model(data, tmp_path, monkeypatch, capsys):
    assert main(_args(data, tmp_path, 1)) == 0
    model = tmp_path / "run" / "model.onnx"
    before, mtime = model.read_bytes(), model.stat().st_mtime_ns
    real_export = torch.onnx.export

    def half_then(exc):
        def export(model_, args, f, *a, **kw):
            Path(f).write_bytes(b"\x08\x07half a model")
            raise exc
        return export

    # Ctrl-C while writing model.onnx of a resumed (longer) search
    monkeypatch.setattr(torch.onnx, "export", half_then(KeyboardInterrupt()))
    assert main(_args(data, tmp_path, 2, "--resume")) == 130
    assert model.read_bytes() == before
    _no_tmp(tmp_path / "run")
    assert [t.state for t in _study(tmp_path).get_trials()].count(TrialState.COMPLETE) == 2  # the search was kept

    # disk full while writing model.onnx: a one-line error, the previous model intact
    capsys.readouterr()
    monkeypatch.setattr(torch.onnx, "export", half_then(OSError(errno.ENOSPC, "No space left on device")))
    assert main(_args(data, tmp_path, 2, "--resume")) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: no space left") and "model.onnx" in last and "Traceback" not in err
    assert model.read_bytes() == before
    _no_tmp(tmp_path / "run")

    monkeypatch.setattr(torch.onnx, "export", real_export)
    assert main(_args(data, tmp_path, 2, "--resume")) == 0
    assert model.stat().st_mtime_ns != mtime and len(_study(tmp_path).get_trials()) == 2  # rewritten; no trial re-run


# ----------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_of_fit_then_resume_completes(data, tmp_path, capsys):
    # every trial trains (a solved probe trial calls no training, and is over before a poll sees it)
    args = _args(data, tmp_path, 3, recipe_text=RECIPE.replace("[all, -1]", "[-1]"))
    per_trial = len(plan_selection(scan_dataset(data), k=2).folds)  # train_model calls a trial (--cv-folds 2)
    # the second trial hangs in its first fold and says so in a file: the process is surely mid-trial
    # when it is killed
    marker = tmp_path / "hanging"
    code = ("import sys, time, autotl.train as t; real = t.train_model; n = []\n"
            f"def slow(*a, **k):\n    n.append(1)\n    if len(n) == {per_trial + 1}:\n"
            f"        open({str(marker)!r}, 'w').close(); time.sleep(600)\n    return real(*a, **k)\n"
            "t.train_model = slow\nfrom autotl.cli import main\nsys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    db, deadline = tmp_path / "run" / "study.db", time.monotonic() + 120
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the fit never reached its second trained trial"
            time.sleep(0.2)
        states = _trial_states_read_only(db)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert states.count("RUNNING") == 1 and "COMPLETE" in states
    killed = states.index("RUNNING")
    _no_tmp(tmp_path / "run", tmp_path / "cache")
    capsys.readouterr()
    assert main(args + ["--resume", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["search"]["states"] == {"complete": 3, "fail": 1}  # only the killed trial is lost
    study = _study(tmp_path)
    trials = study.get_trials()
    assert trials[killed].state == TrialState.FAIL and is_interrupted(trials[killed], interrupted_numbers(study))
    assert Path(doc["model_path"]).is_file()


def _trial_states_read_only(db: Path) -> list[str]:
    """Trial states straight from the SQLite file, read-only: polling through Optuna would create
    or migrate the schema while the child process is creating it (a race on alembic_version)."""
    import sqlite3

    if not db.exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.Error:  # not created yet, or locked for a moment: poll again
        return []


# ----------------------------------------------------------------------------------------- OOM / NaN
class _Bad:
    """Wrap train_model: the ``at``-th call (the first fold of the second trial with 2 folds a trial)
    raises ``exc``, or (``exc is None``) returns a NaN validation score."""

    def __init__(self, exc, at: int = 3):
        self.exc, self.at, self.calls, self.real = exc, at, 0, autotl.train.train_model

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at and self.exc is not None:
            raise self.exc
        result = self.real(*args, **kwargs)
        if self.calls == self.at:
            result.best.accuracy = float("nan")
        return result


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                 RuntimeError("DefaultCPUAllocator: can't allocate memory: out of memory"), None],
                         ids=["torch-oom", "runtime-oom", "nan-score"])
def test_oom_or_nan_trial_is_failed_and_the_study_goes_on(data, tmp_path, monkeypatch, exc):
    monkeypatch.setattr(autotl.train, "train_model", _Bad(exc))
    # fine-tunes only: a frozen-backbone trial is a solved probe and never calls train_model
    recipe = parse_recipe({"trials": 3, "sampler": {"n_startup_trials": 2}, "pruner": {"type": "none"},
                           "space": {"frozen_stages": [-1, -2], "lr": {"low": 0.001, "high": 0.03, "log": True},
                                     "epochs": 1}}, "t")
    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    plan = plan_search(run, TrainConfig(epochs=1, batch_size=8, objective="accuracy"),
                       SearchOptions(trials=3, recipe=recipe, cv_folds=2, cv_repeats=1))
    trials = plan.run_trials().study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    error = trials[1].user_attrs["error"]
    assert ("out of memory" in error) if exc is not None else ("FloatingPointError" in error and "nan" in error)


# ----------------------------------------------------------------------------------------- data fuzzer
def _encoded(fmt: str, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


_NAMES = ["a", "B", "cat", "chat noir", "猫", "über", ".hidden", "x.y.z", "..", "…", "dir.jpg", "-dash", " lead",
          "trail ", "e\u0301", "🐶", "train", "val", "test", "valid", "img.PNG", "ñ", "a" * 60]


def _random_tree(root: Path, rng: np.random.Generator, png: bytes, jpg: bytes) -> None:
    root.mkdir()
    dirs = [root]
    if rng.random() < 0.5:  # half the trees start from a usable data set, then get junk added
        for c in ("cls a", "类b")[: int(rng.integers(1, 3))]:
            (root / c).mkdir()
            dirs.append(root / c)
            for j in range(int(rng.integers(1, 5))):
                (root / c / f"ok{j}.png").write_bytes(png)
    for _ in range(int(rng.integers(0, 9))):
        parent = dirs[int(rng.integers(len(dirs)))]
        d = parent / (str(rng.choice(_NAMES)).strip(".") or "d") if rng.random() < 0.8 else parent / f"c{int(rng.integers(9))}"
        if d.exists() and not d.is_dir():
            continue
        d.mkdir(exist_ok=True)
        dirs.append(d)
    for _ in range(int(rng.integers(0, 25))):
        d = dirs[int(rng.integers(len(dirs)))]
        stem = str(rng.choice(_NAMES)).replace("..", "dd") + str(int(rng.integers(1000)))
        kind = int(rng.integers(9))
        ext = str(rng.choice([".png", ".jpg", ".JPEG", ".txt", "", ".webp", ".png.part"]))
        path = d / (stem + ext)
        if path.exists() or path.is_symlink():
            continue
        if kind <= 2:
            path.with_suffix(".png").write_bytes(png) if kind == 0 else path.write_bytes(jpg if kind == 1 else png)
        elif kind == 3:
            path.write_bytes(b"")
        elif kind == 4:
            path.write_bytes((png if rng.random() < 0.5 else jpg)[: int(rng.integers(1, 60))])
        elif kind == 5:
            path.write_text("not an image\n")
        elif kind == 6:
            path.mkdir()  # a directory named like an image
        elif kind == 7:
            target = dirs[int(rng.integers(len(dirs)))]  # may point at an ancestor: a loop
            path.symlink_to(target, target_is_directory=True)
        else:
            others = [p for p in d.parent.rglob("*") if p.is_file()][:5]
            path.symlink_to(others[0] if others and rng.random() < 0.7 else root / "dangling")


def test_fuzzed_trees_never_crash_scan_dataset(tmp_path):
    rng = np.random.default_rng(20240607)
    png, jpg = _encoded("PNG"), _encoded("JPEG")
    outcomes = {"index": 0, "error": 0}
    start = time.monotonic()
    for i in range(200):
        root = tmp_path / f"t{i}"
        _random_tree(root, rng, png, jpg)
        try:
            index = scan_dataset(root, val_fraction=float(rng.choice([0.1, 0.5])), seed=i)
        except AutotlError as exc:
            assert str(exc).strip() and "\n" not in str(exc).strip(), f"tree {i}: multi-line error {exc!r}"
            outcomes["error"] += 1
            continue
        except Exception as exc:  # noqa: BLE001
            listing = "\n".join(sorted(str(p.relative_to(root)) for p in root.rglob("*")))
            pytest.fail(f"tree {i} crashed scan_dataset with {type(exc).__name__}: {exc}\n{listing}")
        assert len(index.classes) >= 2 and index.train
        outcomes["index"] += 1
    assert outcomes["index"] and outcomes["error"]  # the fuzzer reaches both outcomes
    assert time.monotonic() - start < 60
