"""ONNX export (single self-contained file, dynamic batch, atomic write) and the parity check."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import onnx
import pytest
import timm
import torch

import autotl.export
from autotl.export import INPUT_NAME, OUTPUT_NAME, ParityReport, export_onnx, verify_onnx

MODELS = ["test_efficientnet", "resnet10t"]


def _input_size(model) -> tuple[int, int, int]:
    return tuple(timm.data.resolve_data_config({}, model=model)["input_size"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, onnx path, input_size); the models are exported once per module."""
    out = {}

    def no_fallback(*args, **kwargs):
        raise AssertionError("the TorchScript exporter failed; 'auto' fell back to dynamo")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autotl.export, "_export_dynamo", no_fallback)
        for i, name in enumerate(MODELS):
            torch.manual_seed(i)
            model = timm.create_model(name, pretrained=False, num_classes=3)
            model.train()  # export must use eval mode and give the caller its train mode back
            folder = tmp_path_factory.mktemp(name)
            size = _input_size(model)
            path = export_onnx(model, folder / "model.onnx", input_size=size)
            assert model.training, "export_onnx must restore the caller's train/eval mode"
            out[name] = (model.eval(), path, size)
    return out


def _batch(n: int, size, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *size), generator=g)


@pytest.mark.parametrize("name", MODELS)
def test_export_is_single_valid_file_with_dynamic_batch(exported, name):
    _, path, size = exported[name]
    assert sorted(os.listdir(path.parent)) == ["model.onnx"]  # no external data, no temp files
    proto = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(proto)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = [i for i in proto.graph.input if i.name == INPUT_NAME]
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch axis
    assert [d.dim_value for d in dims[1:]] == list(size)
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("batch", [1, 5])
def test_parity_passes(exported, name, batch):
    model, path, size = exported[name]
    report = verify_onnx(model, path, _batch(batch, size, seed=batch))
    assert report.passed, report.summary()
    assert report.n_images == batch
    assert report.max_abs_diff <= 1e-4
    assert report.argmax_agree and report.argmax_mismatches == 0
    assert report.raise_if_failed() is report
    assert json.loads(json.dumps(report.to_json()))["passed"] is True
    assert not model.training


def test_parity_caps_images_and_accepts_numpy(tmp_path):
    torch.manual_seed(0)
    model, size = _tiny().eval(), (3, 8, 8)
    path = export_onnx(model, tmp_path / "tiny.onnx", input_size=size, exporter="torchscript")
    x = _batch(70, size).numpy()
    report = verify_onnx(model, path, x)
    assert report.passed and report.n_images == 64
    assert verify_onnx(model, path, x[0]).n_images == 1  # one [C, H, W] image


def test_parity_fails_for_a_different_model(exported):
    model, path, size = exported["test_efficientnet"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        torch.manual_seed(123)
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    report = verify_onnx(other, path, _batch(4, size))
    assert not report.passed
    assert report.max_abs_diff > 1e-4
    d = report.to_json()
    assert set(d) == {"n_images", "max_abs_diff", "argmax_agree", "argmax_mismatches", "passed", "atol"}
    with pytest.raises(RuntimeError, match="parity FAILED"):
        report.raise_if_failed()


def test_failed_report_with_argmax_mismatch_and_nan():
    r = ParityReport(n_images=4, max_abs_diff=float("nan"), argmax_agree=False, argmax_mismatches=2,
                     passed=False, atol=1e-4)
    assert json.loads(json.dumps(r.to_json()))["max_abs_diff"] is None
    with pytest.raises(RuntimeError, match="2 argmax mismatches"):
        r.raise_if_failed()


def _tiny():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(4, 2))


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_export_keeps_previous_model(tmp_path, monkeypatch, exc):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")
    calls = []

    def half_then_fail(model, args, f, *a, **kw):
        calls.append(kw.get("dynamo"))
        Path(f).write_bytes(b"\x08\x07half a model")
        raise exc

    monkeypatch.setattr(torch.onnx, "export", half_then_fail)
    with pytest.raises(type(exc)):
        export_onnx(_tiny(), target, input_size=(3, 8, 8))
    assert target.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["model.onnx"]  # no temp file left behind
    # "auto" falls back to the dynamo exporter on an ordinary error, never on Ctrl-C
    assert calls == ([False, True] if isinstance(exc, Exception) else [False])


def test_invalid_onnx_output_never_replaces_previous_model(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"previous model")
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, f, *a, **kw: Path(f).write_bytes(b"garbage"))
    with pytest.raises(Exception):
        export_onnx(_tiny(), target, input_size=(3, 8, 8), exporter="torchscript")
    assert target.read_bytes() == b"previous model"
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_export_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(_tiny(), tmp_path / "m.onnx", input_size=(3, 8, 8), opset=13)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(_tiny(), tmp_path / "m.onnx", input_size=(3, 8, 8), exporter="tf")
    assert not any(tmp_path.iterdir())


def test_auto_falls_back_to_dynamo_when_torchscript_fails(tmp_path, monkeypatch):
    """The dynamo exporter takes over (for real: the model is exported by torch.export and verified)
    when the TorchScript exporter raises, as it will once PyTorch removes it."""
    def torchscript_fails(*args, **kwargs):
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(autotl.export, "_export_torchscript", torchscript_fails)
    torch.manual_seed(0)
    model = timm.create_model(MODELS[0], pretrained=False, num_classes=3).eval()
    size = _input_size(model)
    path = export_onnx(model, tmp_path / "model.onnx", input_size=size)
    assert verify_onnx(model, path, _batch(5, size)).passed
    with pytest.raises(RuntimeError, match="unsupported operator"):
        export_onnx(model, tmp_path / "other.onnx", input_size=size, exporter="torchscript")
    assert os.listdir(tmp_path) == ["model.onnx"]


def test_flip_heads_export_the_backbone_once(tmp_path):
    """Flip TTA runs both views as one batch: the graph holds each backbone once (export time grows
    with the graph), keeps a dynamic batch, and matches PyTorch."""
    from autotl.probe import ProbeNet

    def convs(flip):
        torch.manual_seed(0)
        stages = [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()), torch.nn.Conv2d(4, 6, 3)]
        pool = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        net = ProbeNet([(stages, pool, [1])], torch.randn(2, 10, 3), torch.randn(2, 3), flip=[flip, False])
        path = export_onnx(net, tmp_path / f"flip{flip}.onnx", input_size=(3, 12, 12))
        report = verify_onnx(net, path, _batch(5, (3, 12, 12)))  # 5: not the export's example batch
        assert report.passed, report.summary()
        return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)

    assert convs(True) == convs(False) == 2
