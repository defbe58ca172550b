"""Influence through the last trainable block (``dropout_influence: block``): CG with Hessian-vector
products against leave-one-out retraining of a tiny network, and its wiring into ``DataDropout``."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from autotl.dropout.block_influence import block_influence_scores
from autotl.dropout.influence import fit_logistic_head, influence_scores

L2 = 0.3
N_TRAIN, N_VAL, N_FLIPPED = 60, 24, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _block() -> nn.Module:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():  # non-trivial running statistics: eval-mode BN is part of the block
        block[1].running_mean.uniform_(-0.2, 0.2)
        block[1].running_var.uniform_(0.5, 1.5)
    return block.double()


def _data(n: int, flipped: int, seed: int):
    centres = torch.randn(3, 3, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.arange(n) % 3
    a = centres[y] + 0.8 * torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    y = y.clone()
    y[:flipped] = (y[:flipped] + 1) % 3
    return a, y


def _retrained_reduction(model, block0, a, y, av, yv, i) -> float:
    """Total validation loss at θ̂ minus after retraining without image i (weight 0, same 1/N and
    anchor), warm-started at θ̂ and run to convergence."""
    m = copy.deepcopy(model)
    params = [p for p in m.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in block0.parameters()] + [torch.zeros_like(p) for p in m.head.parameters()]
    assert len(anchors) == len(params)
    mask = torch.ones(len(y), dtype=torch.float64)
    mask[i] = 0
    opt = torch.optim.LBFGS(params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = (mask * nn.functional.cross_entropy(m(a), y, reduction="none")).sum() / len(y) \
            + 0.5 * L2 * sum(((p - q) ** 2).sum() for p, q in zip(params, anchors))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(av), yv, reduction="sum")
                     - nn.functional.cross_entropy(m(av), yv, reduction="sum"))


def test_block_influence_matches_leave_one_out_retraining():
    a, y = _data(N_TRAIN, N_FLIPPED, seed=1)
    av, yv = _data(N_VAL, 0, seed=2)
    block0 = _block()
    res, model = block_influence_scores(block0, a, y, av, yv, 3, l2=L2, fit_tol=1e-10, fit_max_iter=200, cg_tol=1e-12)
    assert res.solver == "block-cg" and model.cg_stop == "converged" and res.residual < 1e-8
    assert res.train_grad_norm < 1e-6  # θ̂ is the optimum the formula assumes
    for p, p0 in zip(model.block.parameters(), block0.parameters()):
        assert not torch.equal(p, p0)  # the block moved: its parameters are part of θ̂ ...
    assert all(torch.equal(p, q) for p, q in zip(block0.parameters(), _block().parameters()))  # ... on a copy

    idx = list(range(14))  # the flipped images and 11 clean ones
    actual = np.array([_retrained_reduction(model, block0, a, y, av, yv, i) for i in idx])
    predicted = res.scores[idx]
    corr = float(np.corrcoef(actual, predicted)[0, 1])
    assert corr > 0.98, corr
    assert np.abs(actual - predicted).max() < 0.35 * np.abs(actual).max()
    big = np.abs(actual) > 0.2 * np.abs(actual).max()  # the images that matter: the predicted sign is right
    assert big.sum() >= 4 and (np.sign(actual[big]) == np.sign(predicted[big])).all()
    # the head-only influence on the same features ignores the block's share and tracks LOO worse:
    # a block influence that dropped the block's parameters would fail the bar above
    with torch.no_grad():
        f, fv = model.features(a), model.features(av)
    head_only = influence_scores(fit_logistic_head(f, y, 3, l2=L2), f, y, fv, yv).scores[idx]
    assert float(np.corrcoef(actual, head_only)[0, 1]) < corr


def test_block_influence_argument_checks():
    a, y = _data(12, 0, seed=1)
    frozen = _block().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        block_influence_scores(frozen, a, y, a, y, 3, l2=L2, fit_max_iter=2)
    with pytest.raises(ValueError, match="l2"):
        block_influence_scores(_block(), a, y, a, y, 3, l2=0.0)
    from autotl.errors import AutotlError

    with pytest.raises(AutotlError, match="focus class"):
        block_influence_scores(_block(), a, y, a, torch.zeros_like(y), 3, l2=L2, focus_class=2, fit_max_iter=2)
