"""Model card, torch-free preprocessing and prediction with onnxruntime."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autotl.card import ModelCard, card_path_for, preprocessing_from_data_config
from autotl.errors import AutotlError
from autotl.predict import Predictor, expand_image_paths, predict, preprocess, softmax

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def _random_image(rng, w, h) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize(
    "cfg",
    [
        dict(input_size=(3, 160, 160), interpolation="bicubic", crop_pct=0.875, crop_mode="center", **IMAGENET),
        dict(input_size=(3, 176, 176), interpolation="bilinear", crop_pct=0.95, crop_mode="center", **IMAGENET),
        dict(input_size=(3, 64, 48), interpolation="bicubic", crop_pct=0.9, crop_mode="center", **IMAGENET),
        dict(input_size=(3, 64, 64), interpolation="lanczos", crop_pct=1.0, crop_mode="squash",
             mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        dict(input_size=(3, 56, 72), interpolation="bilinear", crop_pct=0.875, crop_mode="border", **IMAGENET),
        dict(input_size=(3, 64, 64), interpolation="nearest", crop_pct=None, crop_mode=None, **IMAGENET),
    ],
    ids=["bicubic-0.875", "bilinear-0.95", "nonsquare", "squash", "border", "defaults"],
)
def test_preprocess_matches_timm_eval_transform(cfg):
    from timm.data import create_transform

    tf = create_transform(**cfg, is_training=False)
    rng = np.random.default_rng(0)
    for w, h in [(37, 53), (300, 200), (183, 183), (181, 413), (640, 97), (5, 3), (64, 64)]:
        img = _random_image(rng, w, h)
        expected = tf(img).numpy()
        got = preprocess(img, cfg)
        assert got.dtype == np.float32 and got.shape == expected.shape, (w, h)
        assert np.abs(got - expected).max() <= 1e-5, (w, h)


def test_softmax_is_stable_and_normalised():
    p = softmax(np.array([[1000.0, 0.0, -1000.0], [1.0, 1.0, 1.0]], dtype=np.float32), axis=1)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(p[1], 1 / 3)


# --------------------------------------------------------------------------- model card


def _card(**kw) -> ModelCard:
    base = dict(
        classes=list(CLASSES),
        preprocessing={"input_size": (3, 64, 64), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                       "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"},
        source_model={"name": "test_efficientnet", "weights_origin": "random"},
        frozen_stages=2,
        metrics={"val": {"accuracy": 0.9}, "test": {"accuracy": 0.85}},
        training={"regularizer": "l2sp"},
        data={"root": "data", "n_train": 10},
        parity={"passed": True, "max_abs_diff": 1e-6},
    )
    base.update(kw)
    return ModelCard(**base)


def test_card_round_trip(tmp_path):
    card = _card(extra={"note": "hello"})
    path = card.save(tmp_path / "model.json")
    loaded = ModelCard.load(path)
    assert loaded == card
    assert loaded.preprocessing["input_size"] == [3, 64, 64]  # tuples become JSON lists
    assert datetime.fromisoformat(loaded.created).utcoffset().total_seconds() == 0
    assert loaded.autotl_version
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]


def test_card_preprocessing_from_timm_data_config():
    import timm

    model = timm.create_model("test_efficientnet", num_classes=3)
    cfg = timm.data.resolve_data_config({}, model=model)
    pre = preprocessing_from_data_config(cfg)
    assert set(pre) == set(cfg) == {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
    json.dumps(pre)


def test_card_keeps_unknown_keys_in_extra(tmp_path):
    d = _card().to_json()
    d["from_the_future"] = 1
    (tmp_path / "model.json").write_text(json.dumps(d))
    assert ModelCard.load(tmp_path / "model.json").extra == {"from_the_future": 1}


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"preprocessing": {}}), "missing required key 'classes'"),
        (json.dumps({"classes": [], "preprocessing": {}}), "non-empty list"),
        ("patch:input_size=[3, 64]", "input_size"),
        ("patch:interpolation=cubic", "interpolation"),
        ("patch:crop_mode=zoom", "crop_mode"),
        ("drop:mean", "lacks 'mean'"),
    ],
)
def test_card_validation_errors(tmp_path, content, match):
    path = tmp_path / "model.json"
    if content is not None and content.startswith(("patch:", "drop:")):
        d = _card().to_json()
        op, _, spec = content.partition(":")
        key, _, value = spec.partition("=")
        if op == "drop":
            del d["preprocessing"][key]
        else:
            d["preprocessing"][key] = json.loads(value) if value.startswith("[") else value
        content = json.dumps(d)
    if content is not None:
        path.write_text(content)
    with pytest.raises(AutotlError, match=match) as info:
        ModelCard.load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg and "`autotl fit`" in msg and "train" not in msg


def test_card_save_refuses_an_invalid_card(tmp_path):
    with pytest.raises(ValueError):
        _card(classes=[]).save(tmp_path / "model.json")
    assert not (tmp_path / "model.json").exists()


def test_card_path_for(tmp_path):
    assert card_path_for(tmp_path / "model.onnx") == tmp_path / "model.json"
    assert card_path_for(tmp_path / "foo.onnx") == tmp_path / "model.json"
    (tmp_path / "foo.json").write_text("{}")
    assert card_path_for(tmp_path / "foo.onnx") == tmp_path / "foo.json"


# --------------------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def exported_model(tmp_path_factory):
    """(torch model, model.onnx path, data_config): a random 3-class test_efficientnet with its card."""
    import timm
    import torch

    from autotl.export import export_onnx

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=len(CLASSES)).eval()
    with torch.no_grad():  # spread the logits so that argmax is not decided by float noise
        model.get_classifier().weight.mul_(20.0)
    cfg = timm.data.resolve_data_config({}, model=model)
    folder = tmp_path_factory.mktemp("exported")
    path = export_onnx(model, folder / "model.onnx", input_size=cfg["input_size"])
    _card(preprocessing=cfg).save(folder / "model.json")
    return model, path, cfg


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("images")
    write_image_folder(root, {"a": 3, "b": 2}, size=(71, 50), ext=".png", seed=1)
    write_image_folder(root / "more", {"c": 2}, size=(40, 90), ext=".jpg", seed=2)
    Image.fromarray(np.full((30, 30), 128, np.uint8)).save(root / "grey.JPG")  # greyscale, upper-case ext
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / ".hidden.png").write_bytes(b"ignored")
    (root / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".cache" / "thumb.png")
    (root / "notes.txt").write_text("not an image")
    return root


def _torch_probs(model, cfg, paths):
    import torch
    from timm.data import create_transform

    from autotl._images import load_rgb

    tf = create_transform(**cfg, is_training=False)
    x = torch.stack([tf(load_rgb(p)) for p in paths])
    with torch.no_grad():
        return torch.softmax(model(x), dim=1).numpy()


def test_predict_folder(exported_model, image_dir):
    model, path, cfg = exported_model
    result = predict(path, [image_dir], top_k=2)

    assert [e["path"] for e in result.errors] == [str(image_dir / "broken.jpg")]
    assert result.errors[0]["reason"]
    paths = [p["path"] for p in result.predictions]
    assert paths == sorted(paths) and len(paths) == 8  # 5 png + 2 jpg + grey.JPG; hidden and .txt skipped
    assert not any("/." in p or p.endswith(".txt") for p in paths)

    full = predict(path.parent, image_dir, top_k=10, batch_size=3)  # folder of the model; k > n_classes
    assert full.top_k == 3 and [p["path"] for p in full.predictions] == paths
    for p in full.predictions:
        probs = [t["prob"] for t in p["top"]]
        assert sorted(t["label"] for t in p["top"]) == CLASSES
        assert probs == sorted(probs, reverse=True)
        assert abs(sum(probs) - 1.0) < 1e-6
    for p, q in zip(result.predictions, full.predictions):  # top-2 is a prefix of the full ranking
        assert p["top"] == q["top"][:2]

    expected = _torch_probs(model, cfg, paths)
    got = np.array([[dict((t["label"], t["prob"]) for t in p["top"])[c] for c in CLASSES] for p in full.predictions])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert result.labels == [CLASSES[i] for i in expected.argmax(1)]


def test_prediction_outputs(exported_model, image_dir, tmp_path):
    _, path, _ = exported_model
    result = Predictor(path).predict_paths([image_dir / "a", image_dir / "broken.jpg"], top_k=2)
    assert len(result) == 3 and len(result.errors) == 1

    doc = json.loads(json.dumps(result.to_json()))
    assert doc["classes"] == CLASSES and doc["n_images"] == 3 and doc["n_errors"] == 1
    assert set(doc["predictions"][0]) == {"path", "top"} and set(doc["predictions"][0]["top"][0]) == {"label", "prob"}
    assert set(doc["errors"][0]) == {"path", "reason"}

    out = result.to_csv(tmp_path / "out" / "preds.csv")
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "prob", "top1_label", "top1_prob", "top2_label", "top2_prob", "error"]
    assert len(rows) == 4
    for row, p in zip(rows, result.predictions):
        assert row["path"] == p["path"] and row["label"] == p["top"][0]["label"] == row["top1_label"]
        assert abs(float(row["prob"]) - p["top"][0]["prob"]) < 1e-5 and row["error"] == ""
    assert rows[-1]["path"].endswith("broken.jpg") and rows[-1]["error"] and rows[-1]["label"] == ""

    table = result.table()
    assert table.row_count == 4


def test_predict_user_errors(exported_model, image_dir, tmp_path):
    _, path, _ = exported_model
    with pytest.raises(AutotlError, match="not found"):
        Predictor(tmp_path / "nope.onnx")
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "model.onnx").write_bytes(path.read_bytes())
    with pytest.raises(AutotlError, match="model.json"):  # no card next to the model
        Predictor(lonely / "model.onnx")
    _card(classes=["x", "y"], preprocessing=exported_model[2]).save(lonely / "model.json")
    with pytest.raises(AutotlError, match="3 outputs"):  # card of another model
        Predictor(lonely / "model.onnx")
    (lonely / "model.json").unlink()
    (lonely / "garbage.onnx").write_bytes(b"garbage")
    _card(preprocessing=exported_model[2]).save(lonely / "garbage.json")
    with pytest.raises(AutotlError, match="not a loadable ONNX model"):
        Predictor(lonely / "garbage.onnx")

    predictor = Predictor(path)
    with pytest.raises(AutotlError, match="does not exist"):
        predictor.predict_paths([image_dir / "missing.png"])
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("hi")
    with pytest.raises(AutotlError, match="no images found"):
        predictor.predict_paths(empty)
    with pytest.raises(AutotlError, match="top-k"):
        predictor.predict_paths(image_dir, top_k=0)
    # an explicitly named file is tried whatever its extension; failing, it is reported, not fatal
    res = predictor.predict_paths([image_dir / "notes.txt", image_dir / "a" / "a_000.png"])
    assert len(res) == 1 and res.errors[0]["path"].endswith("notes.txt")


def test_expand_image_paths_dedupes_and_keeps_argument_order(image_dir):
    files = expand_image_paths([image_dir / "more", image_dir / "a" / "a_001.png", image_dir / "more" / "c"])
    assert files[-1] == image_dir / "a" / "a_001.png" and len(files) == 3


def test_predict_does_not_import_torch(exported_model, image_dir):
    _, path, _ = exported_model
    code = textwrap.dedent(
        f"""
        import sys
        from autotl.predict import predict
        res = predict({str(path)!r}, [{str(image_dir)!r}], top_k=2)
        res.table(); res.to_json()
        assert len(res.predictions) == 8, res.to_json()
        heavy = sorted(m for m in ("torch", "torchvision", "timm") if m in sys.modules)
        assert not heavy, heavy
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# --------------------------------------------------------------------------- streaming


def test_streamed_csv_and_bounded_result(exported_model, image_dir, tmp_path):
    _, path, _ = exported_model
    full = Predictor(path).predict_paths(image_dir, top_k=2)
    out = tmp_path / "preds.csv"
    kept = predict(path, image_dir, top_k=2, batch_size=3, csv=out, keep=2)
    assert len(kept.predictions) == 2 and kept.n_images == len(full.predictions) == 8
    assert kept.to_json()["n_images"] == 8 and kept.errors == full.errors
    assert out.read_text() == full.csv_text()  # the streamed file is the same document, rows in path order
    assert not list(tmp_path.glob(".*.tmp"))
    table = kept.table(max_rows=2)
    assert table.row_count == 2 + 1 + 1  # the kept rows, "... 6 more", the unreadable image


def test_csv_rows_are_written_as_they_are_computed(exported_model, image_dir, tmp_path):
    _, path, _ = exported_model
    seen = []

    class Watching(Predictor):
        def stream(self, *args, **kwargs):
            for batch in super().stream(*args, **kwargs):
                yield batch
                partial = list(tmp_path.glob(".preds.csv.*.tmp"))
                seen.append(len(partial[0].read_text().splitlines()) if partial else None)

    Watching(path).predict_paths(image_dir, top_k=1, batch_size=2, csv=tmp_path / "preds.csv")
    assert seen[0] is not None and seen == sorted(seen) and seen[0] < seen[-1]  # grows batch by batch
    assert len((tmp_path / "preds.csv").read_text().splitlines()) == 1 + 8 + 1  # header, 8 images, 1 unreadable


def test_parallel_decode_is_bounded_and_gives_the_serial_answer(exported_model, image_dir, monkeypatch):
    predict_module = importlib.import_module("autotl.predict")  # ``autotl.predict`` is the function

    _, path, _ = exported_model
    serial = Predictor(path).predict_paths(image_dir, batch_size=1, workers=1)
    decoded, consumed = [], [0]
    real = predict_module._decode

    def counting(files, p):
        decoded.append(consumed[0])  # how many batches the consumer had taken when this one started
        return real(files, p)

    monkeypatch.setattr(predict_module, "_decode", counting)
    predictor = Predictor(path)
    for _ in predictor.stream(image_dir, batch_size=1, workers=2):
        consumed[0] += 1
    assert len(decoded) == 9  # 8 images + the unreadable one, one per batch
    assert all(i - taken <= 2 + 1 for i, taken in enumerate(decoded)), decoded  # at most workers + 1 ahead
    parallel = predictor.predict_paths(image_dir, batch_size=1, workers=3)
    assert parallel.predictions == serial.predictions and parallel.errors == serial.errors
