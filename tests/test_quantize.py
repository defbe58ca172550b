"""int8 export: QDQ static quantisation calibrated on training images, the accuracy gate, the card,
predict on the int8 file, and `autotl export RUN --quantize int8`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from autotl import quantize
from autotl.card import ModelCard
from autotl.cli import main
from autotl.predict import expand_image_paths

from conftest import write_image_folder

CLASSES = ["a", "b", "c"]


@dataclass
class _S:
    path: Path
    label: int


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """A run folder with a fp32 model.onnx + card: a small conv net (conv-BN-ReLU6, as the Lite models)
    whose head is fitted by least squares to three colour classes, and its train / val samples."""
    import torch
    from torch import nn

    from autotl.export import export_onnx
    from autotl.predict import preprocess_batch

    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU6(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    pre = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
           "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}
    images = write_image_folder(tmp_path_factory.mktemp("images"), {c: 12 for c in CLASSES}, size=(64, 56))
    samples = [_S(f, CLASSES.index(f.parent.name)) for f in expand_image_paths(images)]
    train, val = samples[::2], samples[1::2]
    from autotl._images import load_rgb

    x = torch.from_numpy(preprocess_batch([load_rgb(s.path) for s in train], pre))
    with torch.no_grad():
        feats = torch.cat([body(x), torch.ones(len(x), 1)], 1)
    target = 10.0 * torch.eye(len(CLASSES))[[s.label for s in train]]
    w = torch.linalg.lstsq(feats, target).solution
    head = nn.Linear(32, len(CLASSES))
    with torch.no_grad():
        head.weight.copy_(w[:-1].T)
        head.bias.copy_(w[-1])
    model = nn.Sequential(body, head).eval()
    run = tmp_path_factory.mktemp("run")
    export_onnx(model, run / "model.onnx", input_size=pre["input_size"])
    card = ModelCard(classes=CLASSES, preprocessing=pre)
    card.save(run / "model.json")
    return run, card.preprocessing, train, val


def test_int8_is_qdq_smaller_and_agrees(fp32_run, tmp_path):
    run, pre, train, val = fp32_run
    calibration = list(quantize._batches([s.path for s in train], pre))
    out = quantize.quantize_static_int8(run / "model.onnx", tmp_path / "m.int8.onnx", calibration)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    weights = [t for t in onnx.load(str(out)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights, "weights are stored as int8"
    assert out.stat().st_size < 0.6 * (run / "model.onnx").stat().st_size
    x = np.concatenate(list(quantize._batches([s.path for s in val], pre)))
    f32 = quantize._session(run / "model.onnx").run(None, {"input": x})[0]
    i8 = quantize._session(out).run(None, {"input": x})[0]
    assert np.mean(f32.argmax(1) == i8.argmax(1)) >= 0.9
    assert np.mean(f32.argmax(1) == [s.label for s in val]) == 1.0  # (the fp32 model is right)
    assert np.corrcoef(f32.ravel(), i8.ravel())[0, 1] > 0.95


def test_gate_keeps_a_faithful_int8_model(fp32_run, tmp_path):
    run, pre, train, val = fp32_run
    folder = _copy_run(run, tmp_path)
    report = quantize.write_int8(folder, pre, train, _val_gate(train, val), max_drop_points=quantize.MAX_DROP_POINTS)
    assert report.kept, report.reason
    assert (folder / quantize.INT8_NAME).is_file()
    assert report.fp32["val_accuracy"] == 1.0 and report.gate["n"] == len(val) and report.n_calibration == len(train)
    for kind in ("fp32", "int8"):
        assert report.to_json()[kind]["size_bytes"] == (folder / report.to_json()[kind]["file"]).stat().st_size
        assert report.to_json()[kind]["latency_ms_per_image"] > 0
    assert report.int8["size_bytes"] < report.fp32["size_bytes"]


def test_gate_refuses_an_int8_model_that_loses_accuracy(fp32_run, tmp_path, monkeypatch):
    run, pre, train, val = fp32_run
    folder = _copy_run(run, tmp_path)
    (folder / quantize.INT8_NAME).write_bytes(b"stale int8 of an earlier model")
    real = quantize.quantize_static_int8

    def lossy(fp32_path, out_path, calibration):  # a real int8 model whose class outputs are rotated
        real(fp32_path, out_path, calibration)
        proto = onnx.load(str(out_path))
        old = proto.graph.output[0].name
        gather = onnx.helper.make_node("Gather", [old + "_q", "rot"], [old], axis=1)
        for node in proto.graph.node:
            node.output[:] = [o + "_q" if o == old else o for o in node.output]
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1, 2, 0], np.int64), "rot"))
        proto.graph.node.append(gather)
        onnx.save(proto, str(out_path))
        return Path(out_path)

    monkeypatch.setattr(quantize, "quantize_static_int8", lossy)
    report = quantize.write_int8(folder, pre, train, _val_gate(train, val))
    assert not report.kept
    assert report.drop_points > quantize.MAX_DROP_POINTS
    assert "refused" in report.reason and "points" in report.reason and "\n" not in report.reason
    assert not (folder / quantize.INT8_NAME).exists(), "a refused (or stale) int8 model is not left in the run"
    assert not list(folder.glob(".*.tmp"))


def _val_gate(train, val):
    return quantize.choose_gate(val, [], train + val, trained_on_val=False)


def test_gate_is_on_images_the_model_did_not_train_on():
    """val only when the model did not train on it; after a search the test split, else augmented views."""
    train, val, test = ([_S(Path(f"{k}{i}.png"), i % 2) for i in range(n)] for k, n in (("t", 10), ("v", 4), ("x", 6)))
    plain = quantize.choose_gate(val, test, train + val, trained_on_val=False)
    assert plain.images == "val" and plain.samples == val and plain.n == 4
    searched = quantize.choose_gate(val, test, train + val, trained_on_val=True)
    assert searched.images == "test" and searched.samples == test and searched.n == 6
    views = quantize.choose_gate(val, [], train + val, trained_on_val=True)
    assert views.images == "views" and views.samples == train + val and views.n == quantize.GATE_VIEWS
    assert all(g.to_json()["trained_on"] is False and g.to_json()["text"] for g in (plain, searched, views))


def test_augmented_views_are_new_inputs_and_seeded():
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    views = [quantize.augmented_view(img, np.random.default_rng([0, i])) for i in range(8)]
    for v in views:
        assert 0 < v.size[0] <= 50 and 0 < v.size[1] <= 40 and v.mode == "RGB"
        assert v.size != img.size or not np.array_equal(np.asarray(v), np.asarray(img))
    assert len({np.asarray(v).tobytes() for v in views}) == len(views)  # each view its own
    again = quantize.augmented_view(img, np.random.default_rng([0, 3]))
    assert np.array_equal(np.asarray(again), np.asarray(views[3]))  # the same seed, the same view


def test_gate_on_augmented_views_compares_the_models_on_views(fp32_run, tmp_path):
    """A searched model without a test split: int8 is judged on views of the labelled images, their
    count and kind on the report, with the two models' agreement beside the accuracy drop."""
    run, pre, train, val = fp32_run
    folder = _copy_run(run, tmp_path)
    gate = quantize.choose_gate(val, [], train + val, trained_on_val=True, views=40)
    report = quantize.write_int8(folder, pre, train, gate)
    assert report.gate == {"images": "views", "n": 40, "trained_on": False, "text": gate.text}
    assert "augmented views" in report.reason and "40" in report.reason
    assert 0.0 <= report.int8["agreement_with_fp32"] <= 1.0
    assert {"views_accuracy"} <= set(report.fp32) and {"views_accuracy"} <= set(report.int8)
    # the views are not the images themselves: the fp32 model, exact on the originals, is not exact on every view
    paths, labels, view = quantize._gate_inputs(gate, 0)
    assert len(paths) == 40 and view is not None
    x = np.concatenate(list(quantize._batches(paths, pre, view=view)))
    plain = np.concatenate(list(quantize._batches(paths, pre)))
    assert x.shape == plain.shape and not np.allclose(x, plain)


def _copy_run(run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    for f in ("model.onnx", "model.json"):
        (folder / f).write_bytes((run / f).read_bytes())
    return folder


# --------------------------------------------------------------------------- the wiring: fit, card, predict, export


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    data = write_image_folder(tmp_path_factory.mktemp("d"), {"red": 12, "blue": 12}, size=(48, 48), splits=["train", "val"])
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    # 6 epochs: a confident model (at 2 its 83 % val accuracy sits on the boundary, where int8 flips images)
    code = main(["fit", str(data), "--model", "test_efficientnet=random", "--out", str(run_dir), "--epochs", "6",
                 "--no-search", "--quantize", "int8", "--json"])
    assert code == 0
    return data, run_dir


def test_fit_quantize_writes_the_card_and_predict_uses_the_int8_file(fitted, capsys):
    data, run_dir = fitted
    card = json.loads((run_dir / "model.json").read_text())
    int8 = card["extra"]["int8"]
    for kind in ("fp32", "int8"):
        assert {"size_bytes", "latency_ms_per_image", "val_accuracy"} <= set(int8[kind])
    assert int8["n_calibration"] == 24 and int8["gate"]["n"] == 24
    assert int8["gate"]["images"] == "val" and not int8["gate"]["trained_on"]  # --no-search: val was held out
    if not int8["kept"]:
        pytest.fail(f"int8 refused on an easy task: {int8['reason']}")
    capsys.readouterr()
    assert main(["predict", str(run_dir / "model.int8.onnx"), str(data / "val"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"].endswith("model.int8.onnx") and doc["n_images"] == 24


def test_a_searched_models_int8_gate_is_not_the_val_it_trained_on(tmp_path, capsys):
    """After a search the refit trains on val: the int8 gate of its card names other images."""
    data = write_image_folder(tmp_path / "d", {"red": 8, "blue": 8}, size=(32, 32), splits=["train", "val"])
    run_dir = tmp_path / "run"
    assert main(["fit", str(data), "--model", "test_efficientnet=random", "--out", str(run_dir), "--trials", "1",
                 "--cv-folds", "2", "--no-ensemble", "--quantize", "int8", "--json"]) == 0
    card = json.loads((run_dir / "model.json").read_text())
    gate = card["extra"]["int8"]["gate"]
    assert gate["images"] == "views" and gate["n"] == quantize.GATE_VIEWS and gate["trained_on"] is False
    assert "val_accuracy" not in card["extra"]["int8"]["fp32"] and "views_accuracy" in card["extra"]["int8"]["fp32"]
    assert card["metrics"]["val"]["role"].startswith("trained on")  # (what the gate avoids)


def test_predict_refuses_an_int8_file_its_card_does_not_list(fitted, tmp_path, capsys):
    data, run_dir = fitted
    other = tmp_path / "run"
    other.mkdir()
    for f in ("model.onnx", "model.json"):
        (other / f).write_bytes((run_dir / f).read_bytes())
    (other / "model.int8.onnx").write_bytes((run_dir / "model.onnx").read_bytes()[:-1] + b"\0")
    capsys.readouterr()
    assert main(["predict", str(other / "model.int8.onnx"), str(data / "val")]) == 2
    assert "is not the model its card" in capsys.readouterr().err


def test_export_command_adds_int8_to_an_existing_run(fitted, tmp_path, capsys):
    data, run_dir = fitted
    plain = tmp_path / "plain"
    assert main(["fit", str(data), "--model", "test_efficientnet=random", "--out", str(plain), "--epochs", "1",
                 "--no-search", "--json"]) == 0
    assert not (plain / "model.int8.onnx").exists()
    capsys.readouterr()
    assert main(["export", str(plain), "--quantize", "int8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    card = ModelCard.load(plain / "model.json")
    assert card.extra["int8"]["kept"] == report["kept"]
    assert (plain / "model.int8.onnx").is_file() == report["kept"]


@pytest.mark.parametrize("args, fragment", [
    (["fit", "{data}", "--quantize", "int4"], "--quantize"),
    (["export", "{run}", "--quantize", "fp16"], "--quantize"),
    (["export", "{nowhere}", "--quantize", "int8"], "no model.onnx"),
])
def test_quantize_user_errors_exit_2(args, fragment, fitted, tmp_path, capsys):
    data, run_dir = fitted
    args = [a.format(data=data, run=run_dir, nowhere=tmp_path) for a in args]
    capsys.readouterr()
    assert main(args) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0]
