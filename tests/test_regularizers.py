"""Regularisers of the strategy search: L2-SP, feature-map KD, DTNH projection, coefficient decay."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from autotl.regularizers import (
    L2SP,
    BaseRegularizer,
    CoefficientSchedule,
    FeatureMapKD,
    NoRegularizer,
    create_regularizer,
    dtnh_direction,
    list_regularizers,
    regularized_backward,
)

SHAPES = [(4, 3, 3, 3), (4,), (7, 5), (5,), (1,)]


def _dot(a, b):
    return sum(float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double())) for x, y in zip(a, b))


def _split(model: nn.Module):
    """(shared, new) named trainable params: new = the classifier head."""
    head_ids = {id(p) for p in model.get_classifier().parameters()}
    shared = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids and p.requires_grad]
    new = [(n, p) for n, p in model.named_parameters() if id(p) in head_ids]
    return shared, new


def _tiny(name="test_efficientnet", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=3)


def _gradient_pair(seed: int, kind: str):
    g = torch.Generator().manual_seed(seed)
    gj = [torch.randn(s, generator=g) for s in SHAPES]
    noise = [torch.randn(s, generator=g) for s in SHAPES]
    if kind == "random":
        go = noise
    elif kind == "opposing":  # strongly opposing: −k∇J + small noise
        k = 0.5 + 10 * torch.rand((), generator=g).item()
        go = [-k * a + 0.05 * b for a, b in zip(gj, noise)]
    elif kind == "aligned":
        go = [2.0 * a + 0.05 * b for a, b in zip(gj, noise)]
    else:  # mixed: opposing on some tensors, aligned on others
        go = [(-3.0 if i % 2 == 0 else 3.0) * a + 0.1 * b for i, (a, b) in enumerate(zip(gj, noise))]
    return gj, go


# --------------------------------------------------------------------------- DTNH direction
@pytest.mark.parametrize("granularity", ["global", "layer"])
@pytest.mark.parametrize("kind", ["random", "opposing", "aligned", "mixed"])
def test_dtnh_direction_never_opposes_empirical_gradient(granularity, kind):
    for seed in range(40):
        gj, go = _gradient_pair(seed, kind)
        for lam in (0.1, 1.0, 30.0):
            d, st = dtnh_direction(gj, go, lam, granularity=granularity)
            scale = math.sqrt(_dot(gj, gj)) * math.sqrt(_dot(d, d)) + 1e-12
            assert _dot(d, gj) >= -1e-5 * scale
            if granularity == "layer":  # per-tensor guarantee as well
                for a, b in zip(d, gj):
                    assert _dot([a], [b]) >= -1e-5 * (float(a.norm() * b.norm()) + 1e-12)
            plain = [a + lam * b for a, b in zip(gj, go)]
            if _dot(gj, go) >= 0 and granularity == "global":  # acute: unchanged direction
                assert not st.projected
                for a, b in zip(d, plain):
                    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            if kind == "opposing":
                assert st.projected
            # the projected part ∇Ω_y = (d − ∇J)/λ is orthogonal to ∇J (per group)
            omega_y = [(a - b) / lam for a, b in zip(d, gj)]
            groups = [list(range(len(gj)))] if granularity == "global" else [[i] for i in range(len(gj))]
            for grp in groups:
                sub_j, sub_o, sub_y = [gj[i] for i in grp], [go[i] for i in grp], [omega_y[i] for i in grp]
                if _dot(sub_j, sub_o) < 0:
                    tol = 1e-4 * math.sqrt(_dot(sub_j, sub_j) * _dot(sub_o, sub_o))
                    assert abs(_dot(sub_y, sub_j)) <= tol
                else:
                    for a, b in zip(sub_y, sub_o):
                        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dtnh_off_is_plain_sum_and_inputs_untouched():
    gj, go = _gradient_pair(3, "opposing")
    gj0 = [t.clone() for t in gj]
    d, st = dtnh_direction(gj, go, 0.7, dtnh=False)
    assert not st.projected and st.inner < 0
    for a, b, c in zip(d, gj, go):
        torch.testing.assert_close(a, b + 0.7 * c)
    for a, b in zip(gj, gj0):
        assert torch.equal(a, b)


def test_dtnh_stats_match_direct_computation():
    gj, go = _gradient_pair(5, "opposing")
    d, st = dtnh_direction(gj, go, 0.5)
    nd, nj, no = (math.sqrt(_dot(x, x)) for x in (d, gj, go))
    assert st.projected and st.n_projected == 1 and st.n_groups == 1
    assert st.inner == pytest.approx(_dot(gj, go), rel=1e-5)
    assert st.norm_d == pytest.approx(nd, rel=1e-4)
    assert st.cos_d_j == pytest.approx(_dot(d, gj) / (nd * nj), rel=1e-4, abs=1e-5)
    assert st.cos_d_omega == pytest.approx(_dot(d, go) / (nd * no), rel=1e-4, abs=1e-5)
    assert st.cos_d_j > 0


def test_dtnh_argument_validation():
    gj, go = _gradient_pair(0, "random")
    with pytest.raises(ValueError, match="granularity"):
        dtnh_direction(gj, go, 1.0, granularity="block")
    with pytest.raises(ValueError, match="lam"):
        dtnh_direction(gj, go, -1.0)


# --------------------------------------------------------------------------- L2-SP
def test_l2sp_penalty_zero_at_start_and_analytic_gradient_matches_autograd():
    model = _tiny("test_efficientnet")
    shared, new = _split(model)
    # at the start ω_S = ω_S⁰: the α term is 0 (the β term is β/2‖ω_new‖² of the fresh head)
    assert float(L2SP(alpha=1.0, beta=0.0).bind(model, shared_params=shared, new_params=new).penalty().detach()) == 0.0
    reg = L2SP(alpha=0.3, beta=0.05).bind(model, shared_params=shared, new_params=new)
    head_sq = sum(float(p.detach().pow(2).sum()) for _, p in new)
    assert float(reg.penalty().detach()) == pytest.approx(0.5 * 0.05 * head_sq, rel=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    params = reg.trainable_params()
    analytic = reg.gradients(params, None)
    auto = BaseRegularizer.gradients(reg, params, None)  # autograd through penalty()
    assert all(a is not None for a in analytic)
    for a, b in zip(analytic, auto):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert float(reg.penalty().detach()) > 0


def test_l2sp_exclude_norm_and_bias_and_unregistered_params():
    model = _tiny("test_efficientnet")
    shared, new = _split(model)
    reg = L2SP(alpha=1.0, beta=1.0, exclude_norm_and_bias=True).bind(model, shared_params=shared, new_params=new)
    params = reg.trainable_params()
    stray = nn.Parameter(torch.ones(3))
    grads = reg.gradients(params + [stray], None)
    assert grads[-1] is None
    for p, g in zip(params, grads):
        assert (g is None) == (p.ndim <= 1)


# --------------------------------------------------------------------------- KD
def test_kd_zero_for_identical_copy_then_positive_after_a_step():
    source = _tiny("test_efficientnet", seed=1)
    model = copy.deepcopy(source)
    model.eval()  # same BN behaviour as the eval-mode source: exact equality at step 0
    shared, new = _split(model)
    reg = FeatureMapKD(layers=["blocks.1", "conv_head"]).bind(
        model, shared_params=shared, new_params=new, source_model=source)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 0])
    logits, state = reg.forward(model, x)
    assert logits.shape == (4, 3)
    assert float(reg.penalty(state).detach()) == 0.0
    opt = torch.optim.SGD(reg.trainable_params(), lr=0.5)
    regularized_backward(nn.functional.cross_entropy(logits, y), reg, state, 1.0, dtnh=True)
    opt.step()
    _, state = reg.forward(model, x)
    assert float(reg.penalty(state).detach()) > 0.0
    assert all(not p.requires_grad for p in source.parameters()) and not source.training


def test_kd_unknown_layer_and_wrong_model():
    model = _tiny("resnet10t")
    shared, new = _split(model)
    with pytest.raises(ValueError, match=r"unknown layer.*layer9.*available:.*layer3"):
        FeatureMapKD(layers=["layer3", "layer9"]).bind(model, shared_params=shared, new_params=new)
    reg = FeatureMapKD(layers="layer3").bind(model, shared_params=shared, new_params=new)  # self-copy source
    with pytest.raises(ValueError, match="not the model"):
        reg.forward(_tiny("resnet10t"), torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="layers"):
        FeatureMapKD(layers=[])
    reg.close()


def test_kd_reductions():
    model = _tiny("test_efficientnet")
    shared, new = _split(model)
    fs = [torch.ones(2, 3, 4, 4)]
    ft = [torch.zeros(2, 3, 4, 4)]
    state = {"student": fs, "teacher": ft}
    paper = FeatureMapKD(["blocks.0"]).bind(model, shared_params=shared, new_params=new)
    mean = FeatureMapKD(["blocks.0"], reduction="mean").bind(model, shared_params=shared, new_params=new)
    assert float(paper.penalty(state)) == pytest.approx(48.0)  # 1/n Σ_i ‖F_i − F_i^s‖² = 96 / 2
    assert float(mean.penalty(state)) == pytest.approx(1.0)


# --------------------------------------------------------------------------- end to end
def _freeze_prefix(model):
    for m in (model.conv_stem, model.bn1, model.blocks[0]):
        m.requires_grad_(False)
    return [p for m in (model.conv_stem, model.bn1, model.blocks[0]) for p in m.parameters()]


@pytest.mark.parametrize("opt_name,reg_name,granularity", [
    ("sgd", "l2sp", "global"), ("adamw", "l2sp", "layer"), ("sgd", "kd", "global"), ("adamw", "none", "global")])
def test_end_to_end_training_decreases_loss_and_keeps_frozen(opt_name, reg_name, granularity):
    model = _tiny("test_efficientnet", seed=2)
    frozen = _freeze_prefix(model)
    frozen0 = [p.detach().clone() for p in frozen]
    shared, new = _split(model)
    kwargs = {"layers": ["blocks.2"], "reduction": "mean"} if reg_name == "kd" else {}
    reg = create_regularizer(reg_name, **kwargs).bind(model, shared_params=shared, new_params=new)
    params = reg.trainable_params()
    assert not any(id(p) in {id(f) for f in frozen} for p in params)
    if opt_name == "sgd":
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.01)
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 3
    model.train()
    sched = CoefficientSchedule(0.1, 0.5)
    losses = []
    for step in range(8):
        opt.zero_grad(set_to_none=True)
        logits, state = reg.forward(model, x)
        loss = nn.functional.cross_entropy(logits, y)
        st = regularized_backward(loss, reg, state, sched(step // 4), dtnh=True, granularity=granularity)
        losses.append(st.loss)
        assert all(p.grad is None for p in frozen)
        assert all(p.grad is not None for p in params)
        opt.step()
    assert losses[-1] < losses[0]
    for p, p0 in zip(frozen, frozen0):
        assert torch.equal(p, p0)


def test_regularized_backward_matches_plain_backward():
    """dtnh=False with L2-SP writes exactly ∇J + λ∇Ω (what loss_J + λΩ backward would give)."""
    model = _tiny("test_efficientnet", seed=3)
    shared, new = _split(model)
    reg = L2SP(alpha=1.0, beta=0.1).bind(model, shared_params=shared, new_params=new)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    lam = 0.7
    loss = nn.functional.cross_entropy(model(x), y) + lam * reg.penalty(None)
    ref = torch.autograd.grad(loss, reg.trainable_params())
    logits, state = reg.forward(model, x)
    st = regularized_backward(nn.functional.cross_entropy(logits, y), reg, state, lam, dtnh=False)
    assert st.penalty > 0 and not st.projected
    for p, r in zip(reg.trainable_params(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-4, atol=1e-6)


def test_aliased_expanded_and_channels_last_gradients():
    """autograd may hand back expanded / shared gradient tensors; channels_last dots are exact."""
    a = nn.Parameter(torch.randn(3, 4))
    b = nn.Parameter(torch.randn(3, 4))
    c = nn.Parameter(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    holder = nn.Module()
    holder.a, holder.b, holder.c = a, b, c
    reg = L2SP(alpha=1.0, beta=1.0).bind(holder, shared_params=[("a", a), ("c", c)], new_params=[("b", b)])
    with torch.no_grad():
        a.add_(1.0)
        c.mul_(2.0)
    loss = (a + b).sum() + 3 * c.sum()  # grads: expanded ones, possibly one tensor for a and b
    st = regularized_backward(loss, reg, None, 0.5, dtnh=True)
    torch.testing.assert_close(a.grad, torch.ones(3, 4) + 0.5 * torch.ones(3, 4))
    torch.testing.assert_close(b.grad, torch.ones(3, 4) + 0.5 * b.detach())
    c0 = c.detach() / 2
    torch.testing.assert_close(c.grad, 3 * torch.ones_like(c) + 0.5 * (c.detach() - c0))
    assert a.grad.data_ptr() != b.grad.data_ptr()
    gj = [torch.ones(3, 4), torch.ones(3, 4), 3 * torch.ones_like(c)]
    go = [torch.ones(3, 4), b.detach(), c.detach() - c0]
    assert st.inner == pytest.approx(_dot(gj, go), rel=1e-5)
    # channels_last vs contiguous operands give the same dot
    x = torch.randn(2, 3, 4, 5)
    _, st2 = dtnh_direction([x.contiguous(memory_format=torch.channels_last)], [x], 1.0)
    assert st2.inner == pytest.approx(float((x * x).sum()), rel=1e-5)


def test_no_regularizer_and_registry():
    model = _tiny("test_efficientnet")
    shared, new = _split(model)
    reg = create_regularizer("none").bind(model, shared_params=shared, new_params=new)
    assert isinstance(reg, NoRegularizer)
    logits, state = reg.forward(model, torch.randn(2, 3, 32, 32))
    st = regularized_backward(nn.functional.cross_entropy(logits, torch.tensor([0, 1])), reg, state, 1.0, dtnh=True)
    assert st.penalty == 0.0 and not st.projected and st.norm_d == pytest.approx(st.norm_j)
    assert {"none", "l2sp", "kd"} <= set(list_regularizers())
    assert isinstance(create_regularizer("L2SP", alpha=0.5), L2SP)
    with pytest.raises(ValueError, match="available"):
        create_regularizer("delta")


def test_coefficient_schedule():
    s = CoefficientSchedule(0.1, 0.9)
    assert s(0) == pytest.approx(0.1)
    assert s(1) == pytest.approx(0.09)
    assert s(3) == pytest.approx(0.1 * 0.9 ** 3)
    assert CoefficientSchedule(2.0, 0.0).values(3) == [2.0, 0.0, 0.0]
    assert CoefficientSchedule(2.0, 1.0).values(3) == [2.0, 2.0, 2.0]
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            CoefficientSchedule(1.0, bad)
    with pytest.raises(ValueError, match="lam0"):
        CoefficientSchedule(-1.0, 0.5)


# --------------------------------------------------------------------- built from a TrainConfig
def _suffix_view(frozen: int):
    from autotl.stages import TransferNet
    from autotl.stages import SuffixView

    net = TransferNet.from_source(_tiny("test_efficientnet"), 3, frozen=frozen)
    return SuffixView(net, frozen)


def _applied_regulariser_gradient(cfg, view):
    """λ0 · ∇Ω as the training loop applies it with ``cfg`` (the regulariser and λ0 exactly as
    ``train_model`` builds them), after moving every parameter off its starting point; None when off."""
    from autotl.regularizers.base import regularizer_class
    from autotl.train import _make_regularizer

    reg = _make_regularizer(cfg, view)
    if reg is None:
        return None, None
    lam0 = type(reg).coefficient(cfg)
    assert lam0 == regularizer_class(cfg).coefficient(cfg)
    net = view.net
    w0 = {id(p): p.detach().clone() for _, p in net.shared_parameters()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in view.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    params = [p for _, p in net.shared_parameters()] + [p for _, p in net.new_parameters()]
    grads = reg.gradients(params, None)
    return lam0, {"shared": [(lam0 * gr, p - w0[id(p)]) for gr, p in zip(grads, params) if id(p) in w0],
                  "new": [(lam0 * gr if gr is not None else torch.zeros_like(p), p.detach())
                          for gr, p in zip(grads, params) if id(p) not in w0]}


@pytest.mark.parametrize("reg_lambda, reg_beta", [(0.01, 0.001), (0.3, 0.0), (0.0, 0.5), (0.0, 0.0)])
def test_l2sp_every_coefficient_combination_means_what_it_says(reg_lambda, reg_beta):
    """reg_lambda = α (pull of the pretrained weights towards ω⁰), reg_beta = β (decay of the new head),
    as the applied gradient λ0·∇Ω shows: α(ω − ω⁰) and β·ω_head. The old mapping gave α = 1 and
    β = reg_beta·1e12 for (0, β)."""
    from autotl.train import TrainConfig

    view = _suffix_view(2)
    lam0, applied = _applied_regulariser_gradient(
        TrainConfig(regularizer="l2sp", reg_lambda=reg_lambda, reg_beta=reg_beta), view)
    if reg_lambda == 0 and reg_beta == 0:
        assert applied is None  # no regulariser: plain fine-tuning
        return
    assert lam0 == 1.0
    assert applied["shared"] and applied["new"]
    for got, delta in applied["shared"]:
        if reg_lambda == 0:
            assert got is None or torch.count_nonzero(got) == 0
        else:
            torch.testing.assert_close(got, reg_lambda * delta, rtol=1e-6, atol=1e-8)
    for got, w in applied["new"]:
        torch.testing.assert_close(got, reg_beta * w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("reg_lambda, reg_beta", [(0.1, 0.0), (0.1, 0.5), (0.0, 0.5)])
def test_kd_coefficient_is_reg_lambda_and_reg_beta_does_not_switch_it_on(reg_lambda, reg_beta):
    from autotl.regularizers.base import regularizer_class
    from autotl.train import TrainConfig, _make_regularizer

    cfg = TrainConfig(regularizer="kd", reg_lambda=reg_lambda, reg_beta=reg_beta)
    reg = _make_regularizer(cfg, _suffix_view(2))
    if reg_lambda == 0:
        assert reg is None  # λ = 0: no teacher forward passes for nothing
    else:
        assert isinstance(reg, FeatureMapKD) and regularizer_class(cfg).coefficient(cfg) == reg_lambda


def test_regularizer_off_when_both_coefficients_are_zero():
    from autotl.train import TrainConfig, _make_regularizer

    for name in ("none", "l2sp", "kd", "not-registered"):
        assert _make_regularizer(TrainConfig(regularizer=name, reg_lambda=0.0, reg_beta=0.0), _suffix_view(2)) is None


def test_kd_from_the_config_matches_trainable_stages_against_a_frozen_copy():
    from autotl.train import TrainConfig, _make_regularizer

    view = _suffix_view(2)
    net = view.net
    trainable = net.stage_names[2:]
    reg = _make_regularizer(TrainConfig(regularizer="kd", reg_lambda=0.1), view)
    assert isinstance(reg, FeatureMapKD)
    assert reg.layers == [f"net.{net.stage_module_name(trainable[-1])}"]  # default: the last trainable stage
    cfg = TrainConfig(regularizer="kd", reg_lambda=0.1, kd_layers=[net.stage_names[0], trainable[0], "nowhere"])
    reg = _make_regularizer(cfg, view)
    assert reg.layers == [f"net.{net.stage_module_name(trainable[0])}"]  # frozen and unknown stages dropped
    teacher = reg.source_model
    assert teacher is not view and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    for (k, a), (_, b) in zip(view.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(a, b), k
    a = net.forward_prefix(torch.randn(4, 3, 32, 32), 2).detach()
    running = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    assert running
    for mode in (False, True):  # the teacher normalises like the student, in eval and in train mode (train last: it moves the student's running statistics)
        view.train(mode)
        with torch.no_grad():
            _, state = reg.forward(view, a)
            assert float(reg.penalty(state)) == pytest.approx(0.0, abs=1e-10), f"train={mode}"
    for k, v in teacher.state_dict().items():  # ... without its running statistics moving
        if k in running:
            assert torch.equal(v, running[k]), k
    reg.close()


def test_kd_teacher_follows_the_students_normalisation_mode_in_train_model(make_image_folder, tmp_path, monkeypatch):
    """train_model trains the student with BN in train mode: at the first step the unchanged copy
    must give Ω = 0 (with the teacher in eval mode it was the gap between batch and running
    statistics)."""
    from autotl import regularizers
    from autotl.data import scan_dataset
    from autotl.features import FeatureExtractor
    from autotl.models import create_source_model
    from autotl.train import TrainConfig, train_model

    index = scan_dataset(make_image_folder(tmp_path / "d", classes={"a": 6, "b": 6}, size=(40, 40)))
    src = create_source_model("test_efficientnet=random")
    stats = []
    real = regularizers.regularized_backward

    def spy(loss, reg, state, lam, **kw):
        st = real(loss, reg, state, lam, **kw)
        stats.append((st.penalty, any(m.training for m in reg.model.modules()
                                      if isinstance(m, torch.nn.modules.batchnorm._NormBase))))
        return st

    monkeypatch.setattr(regularizers, "regularized_backward", spy)
    cfg = TrainConfig(frozen_stages=-2, epochs=1, batch_size=4, regularizer="kd", reg_lambda=0.1)
    train_model(src, index.train, index.val, 2, cfg, extractor=FeatureExtractor(src, cache_dir=None))
    assert len(stats) >= 2
    assert stats[0][1]  # the student's BN was in train mode ...
    assert stats[0][0] == pytest.approx(0.0, abs=1e-9)  # ... and Ω = 0 at step 0 all the same
    assert stats[-1][0] > 0  # after a step, the student has moved
