"""L2-SP and feature-map KD with DTNH inside ``train_model``: on every step the gradient the optimiser
applies is the one of eqs. 6-7 of the DTNH paper, recomputed here independently from ∇J and ∇Ω:

    ⟨∇J, ∇Ω⟩ < 0:  d = ∇J + λ (∇Ω − ⟨∇J, ∇Ω⟩ / ‖∇J‖² ∇J)      else  d = ∇J + λ ∇Ω

and some steps are projected. A DTNH that dropped ∇Ω on obtuse steps (d = ∇J), or never projected,
fails here."""

from __future__ import annotations

import pytest
import torch

from autotl import regularizers
from autotl.regularizers import L2SP, FeatureMapKD
from autotl.train import TrainConfig, train_model
from conftest import tiny_training_setup


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("dtnh") / "d")


def _dense(grads, params):
    return [torch.zeros_like(p) if g is None else g.detach().clone() for g, p in zip(grads, params)]


class _Recorder:
    """Wraps ``regularized_backward``: ∇J and ∇Ω computed independently before the real call, the
    ``.grad`` the optimiser will apply read after it."""

    def __init__(self):
        self.real = regularizers.regularized_backward
        self.steps: list[dict] = []

    def __call__(self, loss, reg, state, lam, *, dtnh=False, params=None, granularity="global"):
        params = list(params)
        gj = _dense(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True), params)
        if isinstance(reg, L2SP):
            go = _dense(reg.gradients(params, state), params)
        else:  # through the graph of the step, kept for the real call
            go = _dense(torch.autograd.grad(reg.penalty(state), params, retain_graph=True, allow_unused=True), params)
        stats = self.real(loss, reg, state, lam, dtnh=dtnh, params=params, granularity=granularity)
        applied = [p.grad.detach().clone() for p in params]
        inner = sum(float(torch.dot(a.double().reshape(-1), b.double().reshape(-1))) for a, b in zip(gj, go))
        nj2 = sum(float(a.double().pow(2).sum()) for a in gj)
        obtuse = dtnh and inner < 0
        if obtuse:  # eqs. 6-7: ∇Ω_x = ⟨∇J, ∇Ω⟩/‖∇J‖² ∇J, ∇Ω_y = ∇Ω − ∇Ω_x, d = ∇J + λ∇Ω_y
            expected = [j + lam * (o - (inner / nj2) * j) for j, o in zip(gj, go)]
        else:
            expected = [j + lam * o for j, o in zip(gj, go)]
        self.steps.append({"lam": lam, "dtnh": dtnh, "obtuse": obtuse, "projected": stats.projected,
                           "applied": applied, "expected": expected, "grad_j": gj,
                           "reg_type": type(reg), "reg": reg})
        return stats


def _check_steps(steps, *, dtnh: bool):
    assert steps
    for i, st in enumerate(steps):
        assert st["projected"] == st["obtuse"], f"step {i}"
        for got, want in zip(st["applied"], st["expected"]):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7, msg=lambda m: f"step {i}: {m}")
    projected = [st for st in steps if st["obtuse"]]
    if not dtnh:
        assert not projected
        return
    assert projected, "no step was projected: the test would not see DTNH's branch"
    assert len(projected) < len(steps)  # both branches of Algorithm 1 ran
    # on projected steps the regulariser's remaining part is far above the tolerance: d = ∇J (∇Ω
    # dropped) would fail the comparison above
    gap = max(max(float((w - j).abs().max()) for w, j in zip(st["expected"], st["grad_j"])) for st in projected)
    assert gap > 1e-4


@pytest.mark.parametrize("dtnh", [True, False])
def test_l2sp_in_train_model_applies_eqs_6_7(setup, monkeypatch, dtnh):
    index, source, ex = setup
    rec = _Recorder()
    monkeypatch.setattr(regularizers, "regularized_backward", rec)
    cfg = TrainConfig(frozen_stages=-2, epochs=3, batch_size=4, lr=0.05, regularizer="l2sp", reg_lambda=0.5,
                      reg_beta=0.05, reg_decay=0.8, dtnh=dtnh, early_stopping=False, label_smoothing=0.0)
    res = train_model(source, index.train, index.val, 2, cfg, extractor=ex)
    steps = rec.steps
    reg = steps[0]["reg"]
    assert isinstance(reg, L2SP) and (reg.alpha, reg.beta) == (0.5, 0.05)
    assert sorted({round(st["lam"], 12) for st in steps}) == sorted(round(0.8 ** e, 12) for e in range(3))
    _check_steps(steps, dtnh=dtnh)
    fraction = sum(st["projected"] for st in steps) / len(steps)
    assert sum(h.projected_fraction for h in res.history) / 3 == pytest.approx(fraction)


def test_kd_with_dtnh_in_train_model_applies_eqs_6_7(setup, monkeypatch):
    index, source, ex = setup
    rec = _Recorder()
    monkeypatch.setattr(regularizers, "regularized_backward", rec)
    cfg = TrainConfig(frozen_stages=-2, epochs=3, batch_size=4, lr=0.05, regularizer="kd", reg_lambda=0.05,
                      dtnh=True, early_stopping=False, label_smoothing=0.0)
    train_model(source, index.train, index.val, 2, cfg, extractor=ex)
    assert rec.steps[0]["reg_type"] is FeatureMapKD and all(st["lam"] == 0.05 for st in rec.steps)
    _check_steps(rec.steps, dtnh=True)
