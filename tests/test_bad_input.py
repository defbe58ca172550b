"""Bad input: no traceback, no silently ignored flag, checks before any work.

Usage errors go through the real console entry point (``python -m autotl`` in a subprocess); a bad
value must be refused before the data are scanned or a model loaded: exit code 2, one line naming
the flag, nothing written. Fast: tiny generated folders, a hand-made ONNX model, no training.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from autotl.errors import AutotlError

MODEL = "test_efficientnet=random"


def autotl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "autotl", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


class cli:
    """``autotl ARGS`` in this process (``autotl.cli.main``, what the console script runs): fast."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args: str) -> SimpleNamespace:
        from autotl.cli import main

        self.capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = self.capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)


@pytest.fixture
def run_cli(capsys):
    return cli(capsys)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", classes={"cat": 4, "dog": 4}, size=(16, 16))


# ============================================================================ 2. usage errors
@pytest.mark.parametrize("args, fragment", [
    (["fit", "{data}", "--nosuch"], "--nosuch"),
    (["frobnicate"], "frobnicate"),
    (["fit", "{data}", "--epochs", "abc"], "--epochs"),
    (["worker", "--study", "x"], "--storage"),
    (["fit", "{data}", "--time-budget"], "--time-budget"),  # the flag without its value
    (["predict"], "MODEL_PATH"),
])
def test_usage_errors_are_one_line_exit_2(args, fragment, data):
    proc = autotl(*[a.replace("{data}", str(data)) for a in args])
    line = assert_one_line_error(proc)
    assert fragment.lower() in line.lower()


def test_bare_autotl_prints_help_without_traceback():
    proc = autotl()
    assert "Traceback" not in proc.stderr
    assert proc.returncode in (0, 2)
    assert "Usage" in proc.stdout + proc.stderr and "predict" in proc.stdout + proc.stderr


def test_main_maps_usage_errors_in_process(capsys):
    from autotl.cli import main

    assert main(["fit", "/x", "--nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and "--nosuch" in err


# ============================================================================ 3. bad values, early
@pytest.mark.parametrize("flags, fragment", [
    (["--epochs", "0"], "--epochs 0"),
    (["--epochs", "-1"], "--epochs -1"),
    (["--batch-size", "0"], "--batch-size 0"),
    (["--lr", "-1"], "--lr -1"),
    (["--lr", "nan"], "--lr nan"),
    (["--objective", "foo"], "--objective"),
    (["--device", "tpu"], "--device tpu"),
    (["--cv-folds", "1"], "--cv-folds 1"),
    (["--trials", "0"], "--trials 0"),
    (["--top-k", "0"], "--top-k 0"),
    (["--frozen-stages", "x"], "--frozen-stages"),
])
def test_fit_bad_values_refused_before_any_work(flags, fragment, data, tmp_path, run_cli):
    out = tmp_path / "run"
    proc = run_cli("fit", data, "--model", MODEL, "--out", out, *flags)
    assert_one_line_error(proc, fragment)
    assert not out.exists()  # no run folder, no scoring.json, no datl/


def test_fit_device_cuda_without_cuda(data, tmp_path, run_cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    assert_one_line_error(run_cli("fit", data, "--model", MODEL, "--out", out, "--device", "cuda"), "--device cuda", "cpu")
    assert not out.exists()


def test_bad_values_through_the_entry_point(data, tmp_path):
    out = tmp_path / "run"
    assert_one_line_error(autotl("fit", data, "--model", MODEL, "--out", out, "--epochs", "0"), "--epochs 0")
    assert_one_line_error(autotl("fit", data, "--model", MODEL, "--out", out, "--time-budget", "-5s"), "--time-budget")
    assert not out.exists()


@pytest.mark.parametrize("kwargs, fragment", [
    ({"epochs": 0}, "--epochs"), ({"epochs": 2.5}, "--epochs"), ({"batch_size": -3}, "--batch-size"),
    ({"lr": float("inf")}, "--lr"), ({"lr": 0.0}, "--lr"), ({"objective": "f1"}, "--objective"),
    ({"device": "cuda:7"}, "--device"), ({"seed": -1}, "--seed"), ({"val_fraction": 0.0}, "--val-fraction"),
    ({"val_fraction": 1.5}, "--val-fraction"), ({"frozen_stages": "most"}, "--frozen-stages"),
    ({"cv_folds": 1}, "--cv-folds"), ({"trials": 0}, "--trials"), ({"top_k": 0}, "--top-k"),
    ({"recipe": "no_such_recipe"}, "--recipe"), ({"storage": ""}, "--storage"),
])
def test_fit_api_validates_before_any_work(kwargs, fragment, data, tmp_path, monkeypatch):
    import autotl.run
    from autotl.fit import fit

    def no_run(*a, **k):  # the checks come before the run folder, the scan and the models
        raise AssertionError("Run.open reached")

    monkeypatch.setattr(autotl.run.Run, "open", classmethod(no_run))
    with pytest.raises(AutotlError, match=fragment):
        fit(data, tmp_path / "run", models=[MODEL], **kwargs)
    assert not (tmp_path / "run").exists()


def test_frozen_stages_beyond_the_model_refused_before_scoring(data, tmp_path):
    from autotl.fit import fit

    out = tmp_path / "run"
    for frozen in (99, -99):
        with pytest.raises(AutotlError, match=rf"--frozen-stages {frozen}: test_efficientnet has \d+ stages"):
            fit(data, out, models=[MODEL], search=False, frozen_stages=frozen)
        assert not (out / "scoring.json").exists() and not (out / "datl").exists()


def test_out_that_is_a_file_or_under_a_file(data, tmp_path, run_cli):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert_one_line_error(run_cli("fit", data, "--model", MODEL, "--out", afile), "--out", "is a file")
    assert_one_line_error(run_cli("fit", data, "--model", MODEL, "--out", afile / "sub"), "--out", "is a file")
    assert afile.read_text() == "mine"


def test_unwritable_out_folder(data, tmp_path, monkeypatch):
    from autotl.options import check_out_dir, check_out_file

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == locked else real_access(p, mode, **k))
    for check in (check_out_dir, check_out_file):
        with pytest.raises(AutotlError, match="--out .*permission denied"):
            check("--out", locked / "x")
    with pytest.raises(AutotlError, match="--out .*permission denied"):
        check_out_dir("--out", locked)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_folder_real(data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_one_line_error(autotl("fit", data, "--model", MODEL, "--out", locked / "run"), "--out", "permission denied")
        assert_one_line_error(autotl("predict", tmp_path / "m.onnx", data, "--csv", locked / "p.csv"), "--csv")
        assert_one_line_error(autotl("report", tmp_path, "--out", locked / "r.html"), "--out")
    finally:
        locked.chmod(0o755)


def test_predict_csv_and_report_out_paths(data, tmp_path, run_cli):
    folder = tmp_path / "folder"
    folder.mkdir()
    afile = tmp_path / "afile"
    afile.write_text("x")
    # refused before the model is even opened (it does not exist here)
    assert_one_line_error(run_cli("predict", tmp_path / "model.onnx", data, "--csv", folder), "--csv", "is a folder")
    assert_one_line_error(run_cli("predict", tmp_path / "model.onnx", data, "--csv", afile / "p.csv"), "--csv", "is a file")
    assert_one_line_error(run_cli("report", tmp_path, "--out", folder), "--out", "is a folder")
    assert_one_line_error(run_cli("report", tmp_path, "--out", afile / "r.html"), "--out", "is a file")


@pytest.mark.parametrize("flags, fragment", [
    (["--l2", "-1"], "--l2 -1"), (["--l2", "nan"], "--l2 nan"), (["--top", "0"], "--top 0"),
    (["--tau", "x"], "--tau"), (["--device", "tpu"], "--device"), (["--mode", "both"], "--mode"),
])
def test_dropout_bad_values(flags, fragment, data, tmp_path, run_cli):
    out = tmp_path / "out"
    assert_one_line_error(run_cli("dropout", data, "--model", MODEL, "--out", out, *flags), fragment)
    assert not out.exists()


def test_score_and_worker_bad_values(data, tmp_path):
    from autotl.score import score
    from autotl.worker import join_study

    for kwargs, fragment in (({"device": "tpu"}, "--device"), ({"seed": -2}, "--seed"), ({"out": data / "cat" / "cat_000.png"}, "--out")):
        with pytest.raises(AutotlError, match=fragment):
            score(data, [MODEL], **kwargs)
    for kwargs, fragment in (({"trials": 0}, "--trials"), ({"heartbeat": 0}, "--heartbeat"), ({"max_retry": -1}, "--max-retry"),
                             ({"device": "tpu"}, "--device")):
        with pytest.raises(AutotlError, match=fragment):
            join_study("sqlite:///x.db", "s", **kwargs)


# ============================================================================ 4. no silently ignored flag
@pytest.mark.parametrize("flags, fragment", [
    (["--time-budget", "garbage"], "--time-budget"),
    (["--time-budget", "-5s"], "--time-budget"),
    (["--time-budget", "0s"], "--time-budget"),
    (["--source-pool", "/no/such/pool"], "--source-pool /no/such/pool"),
    (["--retrieval-bank", "bogus"], "--retrieval-bank"),
    (["--source-loss-weight", "-1"], "--source-loss-weight"),
    (["--study", ""], "--study"),
    (["--retrieval-k", "4"], "--source-pool"),  # without a pool it would do nothing
    (["--retrieval-bank", "gabor"], "--source-pool"),
    (["--focus-class", "cat", "--dropout-tau", "none"], "--focus-class"),
    (["--dry-run-dropout", "--epochs", "3"], "--epochs"),
])
def test_flags_that_would_be_ignored_are_refused(flags, fragment, data, tmp_path, run_cli):
    out = tmp_path / "run"
    assert_one_line_error(run_cli("fit", data, "--model", MODEL, "--out", out, *flags), fragment)
    assert not out.exists()


def test_pool_flags_with_a_pool_act(data, tmp_path):
    from autotl.options import FitOptions

    pool = tmp_path / "pool"
    pool.mkdir()
    FitOptions(fixed_params={"retrieval_bank": "gabor", "source_loss_weight": 0.5},
               options={"source_pool": str(pool)}).check(data, tmp_path / "run")  # accepted: the search uses them
    with pytest.raises(AutotlError, match="--retrieval-k 0"):
        FitOptions(fixed_params={"retrieval_k": 0, "retrieval_bank": "gabor"}, options={"source_pool": str(pool)}).check(data)


# ============================================================================ 7. smaller ones
def _tiny_onnx(folder: Path, classes: list[str]) -> Path:
    """A hand-made ONNX classifier (global average pool + linear) and its card: no torch, no export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from autotl.card import ModelCard

    w = numpy_helper.from_array(np.arange(3 * len(classes), dtype=np.float32).reshape(3, len(classes)) / 10, "w")
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(classes)])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(model, path)
    ModelCard(classes=classes,
              preprocessing={"input_size": (3, 16, 16), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                             "std": (0.25, 0.25, 0.25), "crop_pct": 1.0, "crop_mode": "center"},
              source_model={"name": "tiny", "weights_origin": "random"}, frozen_stages=0, metrics={}, training={},
              data={}, parity={"passed": True}).save(folder / "model.json")
    return path


def test_predict_every_image_unreadable_exits_2(tmp_path, run_cli):
    model = _tiny_onnx(tmp_path / "m", ["a", "b"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"not a png")
    (bad / "y.jpg").write_bytes(b"")
    line = assert_one_line_error(run_cli("predict", model, bad, "--json"), "none of the 2 image(s)", "x.png")
    assert "not an image" in line
    ok = tmp_path / "ok.png"
    Image.new("RGB", (20, 20), (200, 10, 10)).save(ok)
    assert run_cli("predict", model, ok, bad).returncode == 0  # some images read: a success with errors listed


def test_int32_tiff_with_8bit_values_is_not_black(tmp_path):
    from autotl._images import load_rgb

    p = tmp_path / "i32.tif"
    Image.fromarray(np.array([[0, 10, 128, 255]], dtype=np.int32)).save(p)
    assert Image.open(p).mode == "I"
    assert np.asarray(load_rgb(p))[0, :, 0].tolist() == [0, 10, 128, 255]
    p16 = tmp_path / "i32_16.tif"  # 16-bit values in a 32-bit container: scaled as 16-bit
    Image.fromarray(np.array([[0, 257, 65535]], dtype=np.int32)).save(p16)
    assert np.asarray(load_rgb(p16))[0, :, 0].tolist() == [0, 1, 255]
    wide = tmp_path / "i32_wide.tif"  # beyond 16 bits: min-max
    Image.fromarray(np.array([[0, 50000, 100000]], dtype=np.int32)).save(wide)
    assert np.asarray(load_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]


NASTY = "[b]evil\x1b]0;pwned\x07\x1b[2J"


def test_markup_and_escapes_in_class_names_do_not_reach_the_terminal(tmp_path, run_cli):
    model = _tiny_onnx(tmp_path / "m", [NASTY, "plain"])
    img = tmp_path / "img.png"
    Image.new("RGB", (20, 20), (0, 200, 0)).save(img)
    proc = run_cli("predict", model, img, "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stderr and "\x07" not in proc.stderr
    assert "[b]evil" in proc.stderr  # shown as text, not as markup


def test_console_replaces_control_characters():
    from rich.text import Text

    from autotl import _console

    buf = io.StringIO()
    console = _console._SafeConsole(file=buf, width=100, force_terminal=True, color_system="standard")
    console.print(f"[bold]ok[/] {_console.clean_text('a')} b\x1b]0;t\x07c \x9b2J")
    console.print(Text("t\x1b[31mx"))
    text = buf.getvalue()
    assert "\x1b]0;" not in text and "\x9b" not in text and "\x1b[31mx" not in text
    assert "\x1b[1m" in text  # rich's own styling still works
    assert _console.clean_text("a\x1bb\u202ec\nd") == "a\\x1bb\\u202ec\nd"


def test_user_error_message_control_characters_cleaned(capsys):
    from autotl.cli import main

    code = main(["fit", "/nowhere", "--study", "bad\x1b[2Jname", "--model", MODEL])
    err = capsys.readouterr().err
    assert code == 2 and "\x1b" not in err and err.count("\n") == 1


def test_csv_cells_are_neutralised_and_read_back(tmp_path):
    from autotl._csv import read_cell, safe_cell
    from autotl.dropout.report import _csv_text
    from autotl.predict import PredictionResult
    from autotl.report._run import RunFolder, read_csv

    for raw, written in (("=HYPERLINK(\"x\")", "'=HYPERLINK(\"x\")"), ("+1+1", "'+1+1"), ("-cmd", "'-cmd"), ("@SUM(A1)", "'@SUM(A1)"),
                         ("'quoted", "''quoted"), ("cat", "cat"), ("-0.25", "-0.25"), ("1e-3", "1e-3"), ("", "")):
        assert safe_cell(raw) == written and read_cell(written) == raw
    result = PredictionResult(predictions=[{"path": "=evil.png", "top": [{"label": "@cls", "prob": 0.75}]}],
                              errors=[{"path": "-x.png", "reason": "not an image"}], classes=["@cls"], top_k=1)
    rows = list(csv.reader(io.StringIO(result.csv_text())))
    assert rows[1][:3] == ["'=evil.png", "'@cls", "0.75"] and rows[2][0] == "'-x.png"
    text = _csv_text([{"rank": 1, "path": "+p.png", "given_label": "=a", "predicted_label": "b", "influence": -0.5}],
                     ["rank", "path", "given_label", "predicted_label", "influence"])
    row = list(csv.DictReader(io.StringIO(text)))[0]
    assert row["path"] == "'+p.png" and row["given_label"] == "'=a" and row["influence"] == "-0.5"
    (tmp_path / "dropped.csv").write_text(text)
    run = RunFolder(tmp_path)
    back = read_csv(run, "dropped.csv")[0]  # the report reads the real names
    assert back["path"] == "+p.png" and back["given_label"] == "=a"


def test_retrieval_csv_neutralised(tmp_path):
    import torch

    from autotl.data import Sample
    from autotl.retrieval.joint import write_retrieval_csv
    from autotl.retrieval.knn import KnnResult

    targets = [Sample(Path("=t.png"), 0)]
    pool = type("Pool", (), {"samples": [Sample(Path("@p.png"), 0)], "classes": ["-n01"]})()
    knn = KnnResult(distances=torch.tensor([[0.5]]), indices=torch.tensor([[0]]))
    write_retrieval_csv(tmp_path / "r.csv", targets, pool, knn, [torch.tensor([1])], target_classes=["+cls"])
    row = list(csv.DictReader(open(tmp_path / "r.csv")))[0]
    assert (row["target_path"], row["target_class"], row["pool_path"], row["pool_class"]) == ("'=t.png", "'+cls", "'@p.png", "'-n01")


def test_all_trials_failing_says_what_broke(tmp_path):
    import optuna

    from autotl.search._fit import refit_best
    from autotl._recipe import load_recipe

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize")
    for _ in range(3):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={}, distributions={},
                                                  user_attrs={"error": "RuntimeError: CUDA out of memory"}))
    recipe = load_recipe("quick")
    objective = SimpleNamespace(base=SimpleNamespace(objective="accuracy"), candidates=["m"], fixed={})
    plan = SimpleNamespace(run=SimpleNamespace(index=None), recipe=recipe, objective=objective,
                           settings=SimpleNamespace(study_name="autotl"), selection=SimpleNamespace(scored_samples=[]),
                           portfolio=[])
    with pytest.raises(AutotlError) as info:
        refit_best(plan, SimpleNamespace(study=study))
    msg = str(info.value)
    assert "3 of 3 trial(s) failed" in msg and "out of memory" in msg and "--batch-size" in msg
    assert "time-budget" not in msg


# ============================================================================ never destroy a user's file
# One rule for every file autotl writes (autotl.options.check_output_file / check_output_dir): it never
# replaces an input, a data folder's content or a run's files unless that is the command's own output.
def _run_folder(tmp_path: Path) -> Path:
    """A folder as `autotl fit` leaves it: marker, model, card (hand-made: no training)."""
    run = tmp_path / "run"
    _tiny_onnx(run, ["a", "b"])
    (run / "autotl-run.json").write_text("{}")
    return run


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (20, 20), (40 * i, 200, 10)).save(folder / f"img_{i}.png")
    return folder


@pytest.mark.parametrize("target, fragment", [
    ("imgs/img_1.png", "would replace a file in"),  # an image being classified
    ("run/model.onnx", "which this command reads"),  # the model
    ("run/model.json", "which this command reads"),  # its card
    ("elsewhere.png", "is an image"),  # an image this command does not even read
])
def test_predict_csv_never_replaces_what_it_reads(target, fragment, tmp_path, run_cli):
    run, imgs = _run_folder(tmp_path), _images(tmp_path / "imgs")
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere.png")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert_one_line_error(run_cli("predict", run / "model.onnx", imgs, "--csv", tmp_path / target), "--csv", fragment)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    # a new CSV file next to the images replaces nothing: allowed
    proc = run_cli("predict", run / "model.onnx", imgs, "--csv", imgs / "predictions.csv")
    assert proc.returncode == 0 and (imgs / "predictions.csv").read_text().startswith("path,label")


def test_report_never_writes_over_a_run_file(tmp_path, run_cli):
    run = _run_folder(tmp_path)
    model = (run / "model.onnx").read_bytes()
    assert_one_line_error(run_cli("report", run, "--out", run / "model.onnx"), "--out", "is a model")
    assert_one_line_error(run_cli("report", run, "--out", run / "model.json"), "--out", "is a file of the run")
    assert (run / "model.onnx").read_bytes() == model and json_of(run / "model.json")["classes"] == ["a", "b"]
    assert run_cli("report", run).returncode == 0 and (run / "report.html").is_file()  # its own output


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())


@pytest.mark.parametrize("command, flags", [
    ("dropout", ["--out", "{data}/x"]),
    ("score", ["--out", "{data}/x"]),
    ("dropout", ["--out", "{data}/cat/x"]),
    ("dropout", ["--out", "{tmp}/out", "--write-clean", "{data}/clean"]),
    ("dropout", ["--out", "{tmp}/run"]),  # the run folder of a fit: its files would be replaced
    ("score", ["--out", "{tmp}/run"]),
])
def test_dropout_and_score_never_write_into_the_data_or_a_run(command, flags, data, tmp_path, run_cli):
    run = _run_folder(tmp_path)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    args = [f.replace("{data}", str(data)).replace("{tmp}", str(tmp_path)) for f in flags]
    assert_one_line_error(run_cli(command, data, "--model", MODEL, *args), "--")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before  # refused before any work
    assert (run / "model.onnx").is_file()


def test_source_pool_that_is_the_data_is_refused_at_once(data, tmp_path, run_cli):
    out = tmp_path / "run"
    for pool in (data, data / "cat", data.parent):
        assert_one_line_error(run_cli("fit", data, "--model", MODEL, "--out", out, "--source-pool", pool,
                                      "--retrieval-k", "2"), "--source-pool", "overlaps")
    assert not out.exists()


# ============================================================================ wrong failures
@pytest.mark.parametrize("args", [
    ["fit", "{data}", "--epochs", "0"],
    ["fit", "{data}", "--nosuch"],  # a usage error
    ["predict", "{tmp}/no.onnx", "{data}"],
    ["export", "{tmp}", "--quantize", "int8"],
    ["report", "{tmp}/nothing"],
    ["score", "{data}", "--top", "0"],
    ["dropout", "{data}", "--tau", "x"],
    ["worker", "--storage", "sqlite:///x.db", "--study", "s", "--trials", "0"],
    ["info", "{tmp}/nothing"],
])
def test_json_errors_are_one_json_document(args, data, tmp_path, run_cli):
    import json

    proc = run_cli(*[a.replace("{data}", str(data)).replace("{tmp}", str(tmp_path)) for a in args], "--json")
    assert_one_line_error(proc)
    doc = json.loads(proc.stdout)  # exactly one document, nothing else on stdout
    assert doc["exit_code"] == 2 and doc["error"] == proc.stderr.strip().removeprefix("error: ")


def test_predict_lists_gif_in_a_folder_as_skipped(tmp_path, run_cli):
    import json

    model = _tiny_onnx(tmp_path / "m", ["a", "b"])
    imgs = _images(tmp_path / "imgs", 1)
    Image.new("RGB", (20, 20), (9, 9, 200)).save(imgs / "anim.gif")
    proc = run_cli("predict", model, imgs, "--json")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["n_images"] == 1
    assert doc["errors"] == [{"path": str(imgs / "anim.gif"), "reason": "unsupported format .gif: convert to PNG "
                                                                      "(animations: extract the frames)"}]
    only = tmp_path / "gifs"
    only.mkdir()
    Image.new("RGB", (20, 20)).save(only / "x.gif")
    assert_one_line_error(run_cli("predict", model, only), "none of the 1 image(s)", "unsupported format .gif")
    assert run_cli("predict", model, only / "x.gif").returncode == 0  # named directly: classified, as before


def test_help_names_every_recipe_and_model_size(run_cli, monkeypatch):
    import re

    from autotl._recipe import list_recipes

    monkeypatch.setenv("COLUMNS", "300")  # no cell cut short with an ellipsis
    proc = run_cli("fit", "--help")
    text = re.sub(r"[\s│]", "", proc.stdout)  # the help table's borders and wrapping
    assert "NAME[@SIZE][=CHECKPOINT|random]" in text
    recipe_help = text[text.index("--recipe"):text.index("--resume")]
    assert all(name in recipe_help for name in list_recipes())


def test_no_message_suggests_a_command_that_does_not_exist():
    import re

    from autotl.cli import app

    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    import autotl

    source = "\n".join(p.read_text(encoding="utf-8") for p in Path(autotl.__file__).parent.rglob("*.py"))
    suggested = set(re.findall(r"`autotl (\w+)", source))
    for group in re.findall(r"\(autotl (\w+(?: / \w+)+)\)", source):  # "(autotl export / fit)"
        suggested |= set(group.split(" / "))
    assert {"fit", "predict"} <= suggested and suggested <= commands, suggested - commands


def _read_only(monkeypatch, folder: Path) -> None:
    """``folder`` cannot be written (what chmod a-w does to a user who is not root)."""
    real_access, real_open = os.access, os.open

    def access(p, mode, **kw):
        return False if (mode & os.W_OK) and Path(p).resolve() == folder.resolve() else real_access(p, mode, **kw)

    def open_(p, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and Path(p).resolve().parent == folder.resolve():
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, flags, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "open", open_)


def test_export_and_report_on_a_read_only_run_folder(tmp_path, run_cli, monkeypatch):
    run = _run_folder(tmp_path)
    before = sorted(p.name for p in run.iterdir())
    _read_only(monkeypatch, run)
    assert_one_line_error(run_cli("export", run, "--quantize", "int8"), "RUN", "permission denied")
    assert_one_line_error(run_cli("report", run), "report.html", "permission denied")
    assert sorted(p.name for p in run.iterdir()) == before
    assert run_cli("report", run, "--out", tmp_path / "r.html").returncode == 0  # reading it is fine


def test_unwritable_cache_dir_warns_and_runs_without_it(data, tmp_path, run_cli):
    blocker = tmp_path / "afile"  # a folder cannot be made under a file, whoever you are
    blocker.write_text("x")
    proc = run_cli("fit", data, "--model", MODEL, "--out", tmp_path / "run", "--no-search", "--epochs", "1",
                   "--batch-size", "8", "--cache-dir", blocker / "cache")
    assert proc.returncode == 0, proc.stderr
    assert "running without the disk feature cache" in " ".join(proc.stderr.split())
    proc = run_cli("dropout", data, "--model", MODEL, "--out", tmp_path / "d", "--cache-dir", blocker / "cache")
    assert proc.returncode == 0 and "running without the disk feature cache" in " ".join(proc.stderr.split())


def test_a_failing_fit_leaves_no_stub_folder(data, tmp_path, run_cli):
    for flags in (["--frozen-stages", "99"], ["--model", "no_such_model_xyz=random"], ["--dropout-tau", "0",
                  "--focus-class", "zebra"], ["--storage", "bogus://x", "--trials", "1", "--recipe", "quick"]):
        out = tmp_path / "run"
        args = ["--no-search"] if "--storage" not in flags else []
        proc = run_cli("fit", data, "--out", out, "--epochs", "1", "--batch-size", "8", *args,
                       *(["--model", MODEL] if "--model" not in flags else []), *flags)
        assert_one_line_error(proc)
        assert not out.exists(), flags


# ============================================================================ tiny classes
def test_tiny_classes_plan_folds_that_fit_them(tmp_path, make_image_folder):
    from autotl.data import scan_dataset
    from autotl.search._fit import without_unreferenced_dropout
    from autotl.search._folds import plan_selection
    from autotl._recipe import load_recipe

    tiny = scan_dataset(make_image_folder(tmp_path / "two4", {c: 2 for c in "abcd"}, size=(16, 16)))
    sel = plan_selection(tiny)
    assert sel.self_decided == len(sel.folds) > 0
    for f in sel.folds:  # the score part still decides nothing
        assert f.decide and not {s.path for s in f.score} & {s.path for s in f.train + f.decide}
    assert "data dropout is not searched" in sel.decided_by["early_stopping_and_dropout_reference"]
    recipe = without_unreferenced_dropout(load_recipe("default"), sel, {})
    assert recipe.dimension("dropout_tau").choices == (None,)
    with pytest.raises(AutotlError, match="--dropout-tau: .* at least 3 labelled images"):
        without_unreferenced_dropout(load_recipe("default"), sel, {"dropout_tau": 0.0})
    roomy = scan_dataset(make_image_folder(tmp_path / "three", {c: 3 for c in "ab"}, size=(16, 16)))
    assert plan_selection(roomy).self_decided == 0
    assert without_unreferenced_dropout(load_recipe("default"), plan_selection(roomy), {}).dimension("dropout_tau").choices[-1] == 0.0


def test_tiny_classes_search_completes(tmp_path, make_image_folder, run_cli):
    import json

    two4 = make_image_folder(tmp_path / "two4", {c: 2 for c in "abcd"}, size=(16, 16))
    out = tmp_path / "run"
    proc = run_cli("fit", two4, "--model", MODEL, "--out", out, "--recipe", "quick", "--trials", "2",
                   "--batch-size", "8", "--cache-dir", tmp_path / "cache", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = json.loads(proc.stdout)["search"]
    assert search["states"] == {"complete": 2} and search["selection"]["self_decided_folds"] > 0
    assert "val/" not in proc.stderr
