"""DATL importance weights w = P_t / P_s with P_s the source pool's own class distribution, and the
weights reaching the source-head loss of joint fine-tuning."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from autotl.features import FeatureExtractor
from autotl.models import create_source_model
from autotl.retrieval import JointData, pool_class_weights, scan_pool
from autotl.retrieval.joint import JointFineTuningHooks, random_neighbours
from autotl.retrieval.strategy import _class_weights
from autotl.transferability.datl import pool_importance_weights
from autotl.score import safe_label
from autotl.stages import TransferNet
from autotl.train import TrainConfig, TrainingSetup
from conftest import write_image_folder

# two ImageNet wnids (tench = 0, English springer = 217) with unequal counts, and one other class
POOL = {"n01440764": 9, "n02102040": 3, "other": 4}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = write_image_folder(tmp_path_factory.mktemp("datl") / "pool", POOL, ext=".jpg", seed=3, size=(32, 32))
    return scan_pool(root, cache_dir=None)


def test_pool_weights_divide_by_the_pools_class_distribution():
    p_t = np.array([0.1, 0.3, 0.2, 0.4])  # over 4 source classes
    # pool classes: source 0 (30 images), source 1 (10), unmatched (20)
    w, p_s = pool_importance_weights(p_t, [0, 1, None], [30, 10, 20])
    np.testing.assert_allclose(p_s, [0.5, 1 / 6, 1 / 3])
    # P_t restricted to the pool's source classes: (0.25, 0.75); P_s(y | matched) = (0.75, 0.25)
    np.testing.assert_allclose(w, [0.25 / 0.75, 0.75 / 0.25, 1.0])  # a uniform prior would give a 1:3 ratio, not 1:9
    assert float((w * p_s).sum()) == pytest.approx(1.0)  # mean weight over the pool images
    # every class matched: exactly P_t'(y) / P_s(y)
    w, _ = pool_importance_weights(p_t, [0, 1, 3], [10, 10, 20])
    np.testing.assert_allclose(w, (p_t[[0, 1, 3]] / 0.8) / np.array([0.25, 0.25, 0.5]))
    # two pool classes of one source class share its P_t and P_s
    w, _ = pool_importance_weights(p_t, [1, 1, 0], [5, 15, 20])
    np.testing.assert_allclose(w, [1.5, 1.5, 0.5])
    w, _ = pool_importance_weights(np.zeros(4), [0, 1, None], [1, 1, 1])  # no target mass: uniform
    np.testing.assert_array_equal(w, 1.0)
    with pytest.raises(ValueError, match="source_index"):
        pool_importance_weights(p_t, [0, 9, None], [1, 1, 1])


def test_pool_class_weights_map_wnids_onto_an_imagenet_p_t(pool):
    counts = np.bincount(pool.labels, minlength=3)
    assert counts.tolist() == [9, 3, 4]
    p_t = np.full(1000, 0.5 / 998)
    p_t[0], p_t[217] = 0.2, 0.3
    cw, info = pool_class_weights(pool, p_t)
    assert info["matched_classes"] == 2 and info["used"] == "datl" and "16 images" in info["p_s"]
    share = 12 / 16
    np.testing.assert_allclose(cw, [share * 0.4 / (9 / 16), share * 0.6 / (3 / 16), 1.0], rtol=1e-6)
    assert float((cw * counts).sum() / counts.sum()) == pytest.approx(1.0)


def test_the_strategy_pairs_the_saved_p_t_with_the_pools_distribution(pool, tmp_path):
    """``source_weights datl`` reads P_t from the run folder (not the saved w, whose P_s is the
    scoring prior) and divides by the pool's distribution."""
    label = "tiny@64"
    p_t = np.full(1000, 0.5 / 998)
    p_t[0], p_t[217] = 0.2, 0.3
    prior = np.full(1000, 1e-3)
    (tmp_path / "datl").mkdir()
    np.savez_compressed(tmp_path / "datl" / f"{safe_label(label)}.npz", p_t=p_t, p_s=prior, w=p_t / prior,
                        class_names=np.array([str(i) for i in range(1000)]), model=np.array(label),
                        prior=np.array("uniform"), score=np.array(0.0))
    ctx = SimpleNamespace(options={"source_weights": "datl"}, run_dir=tmp_path, source=SimpleNamespace(label=label))
    weights, used = _class_weights(ctx, pool)
    np.testing.assert_allclose(weights, pool_class_weights(pool, p_t)[0])
    assert "P_s = the pool's class distribution" in used
    ctx.options["source_weights"] = "uniform"
    assert _class_weights(ctx, pool) == (None, "uniform")


def _hooks(pool, class_weights):
    source = create_source_model("test_efficientnet@64=random")
    train = [pool.samples[0], pool.samples[-1]]  # any two images: only the source loss is exercised
    cfg = TrainConfig(frozen_stages=-1, label_smoothing=0.0, seed=0)
    joint = JointData(pool=pool, neighbours=random_neighbours(len(pool), seed=0), k0=1, source_weight=0.7,
                      class_weights=class_weights, source_head_init="random")
    hooks = JointFineTuningHooks(joint, source, train, 2, cfg)
    net = TransferNet.from_source(source.model, 2, -1)
    hooks.setup(TrainingSetup(net, net.frozen, False, torch.device("cpu"), FeatureExtractor(source, cache_dir=None),
                              None, torch.tensor([0, 1])))
    return hooks


def test_datl_weights_reach_the_source_loss_and_a_zero_weight_removes_a_class(pool):
    w = np.array([0.0, 2.5, 1.0], np.float32)
    weighted, plain = _hooks(pool, w), _hooks(pool, None)
    plain.source_head.load_state_dict(weighted.source_head.state_dict())
    torch.manual_seed(0)
    feats = torch.randn(6, weighted.source_head.in_features)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    ce = nn.functional.cross_entropy(weighted.source_head(feats), labels, reduction="none").detach()
    wy = torch.as_tensor(w)[labels]

    x_w = feats.clone().requires_grad_(True)
    loss_w = weighted.extra_loss(x_w, labels)
    x_p = feats.clone().requires_grad_(True)
    loss_p = plain.extra_loss(x_p, labels)
    assert float(loss_w.detach()) == pytest.approx(0.7 * float((wy * ce).mean()), rel=1e-5)
    assert float(loss_p.detach()) == pytest.approx(0.7 * float(ce.mean()), rel=1e-5)
    assert float((loss_w - loss_p).detach()) == pytest.approx(0.7 * float(((wy - 1) * ce).mean()), rel=1e-4)

    loss_w.backward()
    loss_p.backward()
    zero = labels == 0
    assert torch.count_nonzero(x_w.grad[zero]) == 0  # weight 0: class 0's pool images give no gradient
    assert torch.count_nonzero(x_p.grad[zero]) > 0
    torch.testing.assert_close(x_w.grad[labels == 1], 2.5 * x_p.grad[labels == 1])  # and w scales it
    # the source head's gradient is that of the batch without class 0 (scaled by its share of rows)
    weighted.source_head.zero_grad()
    weighted.extra_loss(feats, labels).backward()
    g_full = weighted.source_head.weight.grad.clone()
    weighted.source_head.zero_grad()
    weighted.extra_loss(feats[~zero], labels[~zero]).backward()
    torch.testing.assert_close(g_full, weighted.source_head.weight.grad * (~zero).float().mean(), rtol=1e-5, atol=1e-7)


def test_the_card_names_the_p_s_used():
    from autotl.card import datl_prior

    scoring = {"models": [{"model": "m", "datl": {"prior": "uniform (ImageNet-1k class counts not bundled)"}}]}
    assert datl_prior(scoring, "m", {}) == ("uniform (ImageNet-1k class counts not bundled) "
                                            "(no source pool: DATL ranks models only)")
    pooled = {"retrieval": {"source_weights": "datl: w = P_t / P_s, P_s = the pool's class distribution (2/3 classes matched)",
                            "pool_images": 16}}
    assert datl_prior(scoring, "m", pooled) == "the source pool's class distribution (16 images); weights the source loss"
    uniform = {"retrieval": {"source_weights": "uniform (no DATL weights in the run folder)", "pool_images": 16}}
    assert "source-loss weights uniform" in datl_prior(scoring, "m", uniform)
    assert datl_prior(None, "m", None) is None
