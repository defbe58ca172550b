"""Stages from timm's own grouping: several exact cuts for ResNet, ConvNeXt and ViT, the per-block
EfficientNet / MobileNet split kept, glue code in forward_features never cut through."""

import copy

import pytest
import timm
import torch
from torch import nn

from autotl.stages import TransferNet, staged_backbone


pytestmark = pytest.mark.usefixtures("one_thread")


def _input(model: nn.Module, small: int = 64) -> torch.Tensor:
    cfg = timm.models.get_model_input_config(model)
    size = cfg["input_size"][-1] if cfg["fixed_input_size"] else small
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def _assert_every_cut_is_exact(model: nn.Module, stages, pool, x: torch.Tensor) -> None:
    """Freezing the first n stages and running prefix then suffix gives the model's own logits."""
    with torch.no_grad():
        want = model(x)
        for n in range(len(stages) + 1):
            net = TransferNet(stages, pool, model.get_classifier(), frozen=n).eval()
            got = net.forward_from(net.forward_prefix(x, n), n)
            assert torch.allclose(got, want, atol=1e-5), f"cut {n} ({net.stage_names[:n]} frozen)"


@pytest.mark.parametrize("name, expected", [
    ("resnet10t", ["stem", "layer1", "layer2", "layer3", "layer4"]),  # the list autotl always used
    ("convnext_atto", ["stem", "stages.0", "stages.1", "stages.2", "stages.3"]),
    ("test_vit", ["stem", *(f"blocks.{i}" for i in range(5)), "blocks.5+norm"]),  # timm groups the final norm with the last block
])
def test_timm_grouping_gives_several_exact_stages(name, expected):
    model = timm.create_model(name, pretrained=False).eval()
    stages, pool = staged_backbone(model)
    assert [n for n, _ in stages] == expected and len(stages) >= 3
    _assert_every_cut_is_exact(model, stages, pool, _input(model))


@pytest.mark.parametrize("name, first_stage", [("resnet10t", 1), ("convnext_atto", 1)])
def test_stage_outputs_are_timms_feature_maps(name, first_stage):
    """Each stage ends where timm's own last four feature maps are taken (layer1-4, stages.0-3)."""
    model = timm.create_model(name, pretrained=False).eval()
    stages, _ = staged_backbone(model)
    x = _input(model)
    with torch.no_grad():
        maps = model.forward_intermediates(x, indices=4, intermediates_only=True)
        outputs = []
        for _, stage in stages:
            x = stage(x)
            outputs.append(x)
    assert len(maps) == len(outputs[first_stage:]) == 4
    for fmap, out in zip(maps, outputs[first_stage:]):
        assert torch.allclose(out, fmap, atol=1e-5)


def test_resnet_stem_is_the_same_modules_as_before():
    model = timm.create_model("resnet10t", pretrained=False)
    stages, _ = staged_backbone(model)
    stem = stages[0][1]
    assert list(stem) == [model.conv1, model.bn1, model.act1, model.maxpool]
    assert [m for _, m in stages[1:]] == [model.layer1, model.layer2, model.layer3, model.layer4]


@pytest.mark.parametrize("name, n_blocks, head", [
    ("test_efficientnet", 5, ("conv_head", "bn2")),
    ("tf_efficientnet_lite0", 7, ("conv_head", "bn2")),
    ("mobilenetv3_small_050", 6, ("global_pool", "conv_head", "norm_head", "act2", "flatten")),
])
def test_efficientnet_family_keeps_its_split(name, n_blocks, head):
    """Cache keys and recipes count these stages: stem, every block, the conv head."""
    model = timm.create_model(name, pretrained=False).eval()
    stages, pool = staged_backbone(model)
    assert [n for n, _ in stages] == ["stem", *(f"blocks.{i}" for i in range(n_blocks)), "head"]
    assert list(stages[-1][1]) == [getattr(model, h) for h in head]
    _assert_every_cut_is_exact(model, stages, pool, _input(model))


class _Glued(nn.Module):
    """A timm-style model whose forward_features may run code between two blocks or at the end."""

    def __init__(self, glue: str | None):
        super().__init__()
        self.glue = glue
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.head = nn.Linear(4, 2)

    def group_matcher(self, coarse=False):
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    def forward_features(self, x):
        x = self.blocks[0](self.stem(x))
        if self.glue == "in place":
            x.mul_(2)  # same tensor object: only its version counter shows the edit
        elif self.glue == "new tensor":
            x = x * 2
        x = self.blocks[2](self.blocks[1](x))
        return x.relu() if self.glue == "at the end" else x

    def forward_head(self, x, pre_logits=False):
        x = x.mean((2, 3))
        return x if pre_logits else self.head(x)

    def get_classifier(self):
        return self.head

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


@pytest.mark.parametrize("glue, expected", [
    (None, ["stem", "blocks.0", "blocks.1", "blocks.2"]),
    ("in place", ["stem", "blocks.2"]),  # no cut before blocks.1: the suffix would skip the glue
    ("new tensor", ["stem", "blocks.2"]),
    ("at the end", ["features"]),  # no clean cut at all: one stage, freeze all or nothing
])
def test_code_between_modules_is_never_cut_through(glue, expected):
    torch.manual_seed(0)
    model = _Glued(glue).eval()
    stages, pool = staged_backbone(model)
    assert [n for n, _ in stages] == expected
    _assert_every_cut_is_exact(model, stages, pool, torch.randn(2, 3, 8, 8))


def test_vit_stem_holds_the_tokens_and_copies_cleanly():
    """The ViT stem (patch embedding, class token, position embedding) freezes as one stage, and
    a deep copy of the net (early stopping, KD teachers) is independent and computes the same."""
    model = timm.create_model("test_vit", pretrained=False).eval()
    net = TransferNet.from_source(model, 3, frozen=1).eval()
    stem_params = dict(net.stages[0].named_parameters())
    assert any(n.endswith("cls_token") for n in stem_params) and any(n.endswith("pos_embed") for n in stem_params)
    assert not any(p.requires_grad for p in stem_params.values())
    assert all(p.requires_grad for p in net.stages[1].parameters())
    twin = copy.deepcopy(net)
    x = _input(model)
    with torch.no_grad():
        assert torch.equal(twin(x), net(x))
        next(twin.stages[0].parameters()).add_(1.0)
        assert not torch.equal(twin(x), net(x))
    assert net.state_dict().keys() == twin.state_dict().keys()


def test_pool_parameters_train_with_the_last_stage():
    """ConvNeXt normalises after pooling: that norm is frozen only when every stage is."""
    model = timm.create_model("convnext_atto", pretrained=False)
    probe = TransferNet.from_source(model, 3, frozen="all")
    pool_params = list(probe.pool.parameters())
    assert pool_params and not any(p.requires_grad for p in pool_params)
    assert probe.shared_parameters() == []
    probe.train()
    assert not probe.pool.training  # cached pooled features stay valid
    tuned = TransferNet.from_source(model, 3, frozen=-1).train()
    names = [n for n, _ in tuned.shared_parameters()]
    assert any(n.startswith("pool.") for n in names) and tuned.pool.training
    assert all(p.requires_grad for p in tuned.pool.parameters())
    assert not any(p.requires_grad for p in tuned.stages[0].parameters())
    assert len({id(p) for _, p in tuned.shared_parameters()}) == len(names)
