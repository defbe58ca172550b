"""The command line: exit codes, one-line errors, JSON on stdout, the end-to-end fit → predict path."""

import json
import subprocess
import sys

import pytest

from autotl import __version__
from autotl.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_version_and_help(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"autotl {__version__}"
    proc = subprocess.run([sys.executable, "-m", "autotl"], capture_output=True, text=True)
    assert "fit" in proc.stdout + proc.stderr and "predict" in proc.stdout + proc.stderr  # no_args_is_help


@pytest.mark.parametrize("args, fragment", [
    (["fit", "/no/such/folder"], "/no/such/folder"),
    (["predict", "/no/such/model.onnx", "."], "/no/such/model.onnx"),
    (["fit", "{data}", "--frozen-stages", "most"], "--frozen-stages"),
    (["fit", "{data}", "--model", "no_such_net_123"], "no_such_net_123"),
])
def test_user_errors_exit_2_with_one_line(args, fragment, capsys, make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 3, "b": 3})
    args = [a.replace("{data}", str(data)) for a in args]
    code, out, err = run(args, capsys)
    assert code == 2
    assert out == ""
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0]


def test_one_class_is_refused(capsys, make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"only": 4})
    code, _, err = run(["fit", str(data), "--model", "test_efficientnet=random"], capsys)
    assert code == 2 and "class" in err


@pytest.mark.slow
def test_fit_then_predict_json(capsys, make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"red": 10, "blue": 10}, size=(48, 48))
    run_dir = tmp_path / "run"
    code, out, err = run(["fit", str(data), "--model", "test_efficientnet=random", "--out", str(run_dir),
                          "--epochs", "3", "--no-search", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)  # stdout holds exactly one JSON document
    for key in ("run_dir", "model_path", "card_path", "classes", "source_model", "weights_origin", "training",
                "metrics", "parity", "data", "seconds"):
        assert key in doc
    assert doc["classes"] == ["blue", "red"]
    assert doc["parity"]["passed"] and doc["parity"]["max_abs_diff"] <= 1e-4
    assert 0.0 <= doc["metrics"]["val"]["accuracy"] <= 1.0
    assert (run_dir / "model.onnx").is_file() and (run_dir / "model.json").is_file()
    card = json.loads((run_dir / "model.json").read_text())
    assert card["classes"] == ["blue", "red"] and "random" in card["source_model"]["weights_origin"]
    # no source pool: the card says DATL used the uniform prior, and only to rank models
    assert card["source_model"]["datl_p_s"].startswith("uniform") and "no source pool" in card["source_model"]["datl_p_s"]

    code, out, err = run(["predict", str(run_dir / "model.onnx"), str(data / "red"), "--json", "--top-k", "2"], capsys)
    assert code == 0, err
    pred = json.loads(out)
    assert len(pred["predictions"]) == 10 and not pred["errors"]
    assert all(abs(sum(t["prob"] for t in p["top"]) - 1) < 1e-4 for p in pred["predictions"])

    code, out, _ = run(["info", str(run_dir), "--json"], capsys)
    assert code == 0 and json.loads(out)["classes"] == ["blue", "red"]


def test_info_environment_json(capsys):
    code, out, _ = run(["info", "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["autotl"] == __version__ and "packaged_models" in doc


def test_info_leads_with_the_estimate(capsys, tmp_path):
    """`autotl info RUN` prints the card's headline estimate before anything else."""
    from autotl.card import ModelCard
    from autotl.estimate import Estimate, held_out

    est = Estimate(**held_out(0.9, 40, kind="cross-validated", method="mean over the scoring folds").to_json())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ModelCard(classes=["a", "b"], preprocessing={"input_size": [3, 32, 32], "interpolation": "bicubic",
                                                 "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875},
              metrics={"val": {"accuracy": 1.0, "role": "trained on: the refit trained on val"}},
              estimate=est.to_json()).save(run_dir / "model.json")
    code, out, err = run(["info", str(run_dir)], capsys)
    first = next(line for line in err.splitlines() if line.strip())
    assert code == 0 and first == f"estimate for new images: {est.line()}"
    assert first.startswith("estimate for new images: 90.0 % (95 % interval ") and "cross-validated, 40 images" in first
    code, out, _ = run(["info", str(run_dir), "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and next(iter(doc)) == "estimate" and doc["estimate"]["accuracy"] == 0.9
