"""``TrainingHooks``: what a trainer built on ``train_model`` adds (extra rows and loss terms, epoch
and round callbacks) reaches the loop, in the documented order."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from autotl.models import create_source_model
from autotl.train import TrainConfig, TrainingHooks, train_model
from conftest import tiny_training_setup


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny two-class set, a random-weight model and one extractor (pooled features cached once)."""
    return tiny_training_setup(tmp_path_factory.mktemp("hooks") / "d")


class _ProbeHead(TrainingHooks):
    """A second head trained only by the extra term, on extra rows that are the training inputs
    again with three-class labels: nothing but ``extra_loss`` gives the probe a gradient."""

    def setup(self, run):
        self.probe = nn.Linear(run.net.head.in_features, 3)
        self.before = self.probe.weight.detach().clone()
        self.extra = TensorDataset(run.train_inputs, torch.arange(len(run.train_labels)) % 3)
        self.rows_seen, self.calls = 0, 0
        return self.probe

    def extra_dataset(self):
        return self.extra

    def extra_loss(self, features, labels):
        self.calls += 1
        self.rows_seen += len(labels)
        return nn.functional.cross_entropy(self.probe(features), labels)


@pytest.mark.parametrize("regularizer", ["none", "l2sp"])  # plain backward; regularised backward over `params`
def test_extra_loss_term_reaches_the_optimiser_step(setup, regularizer):
    index, source, ex = setup
    cfg = TrainConfig(frozen_stages="all", epochs=2, batch_size=4, lr=0.05, regularizer=regularizer,
                      reg_lambda=0.01 if regularizer == "l2sp" else 0.0)
    hooks = _ProbeHead()
    res = train_model(source, index.train, index.val, 2, cfg, extractor=ex, hooks=hooks)
    n = len(index.train)
    assert hooks.calls == 2 * -(-n // 4) and hooks.rows_seen == 2 * n  # every step, one extra row per training row
    assert not torch.allclose(hooks.probe.weight.detach().cpu(), hooks.before)  # the extra term was stepped on
    assert res.net.head.out_features == 2  # the hooks' module is trained beside the net, not part of it


class _Log(TrainingHooks):
    """Records the epoch and round callbacks of a run split into rounds starting at epochs 0, 2, 3."""

    round_starts = (0, 2, 3)

    def __init__(self):
        self.calls: list[str] = []

    def setup(self, run):
        self.calls.append("setup")

    def start_epoch(self, epoch):
        self.calls.append(f"start {epoch}")

    def end_epoch(self, metrics):
        self.calls.append(f"end {metrics.epoch}")

    def end_round(self, round_idx):
        self.calls.append(f"round {round_idx}")


def test_epoch_and_round_callbacks_run_in_order(setup):
    index, source, ex = setup
    cfg = TrainConfig(frozen_stages="all", epochs=4, batch_size=8, patience=10)
    hooks = _Log()
    train_model(source, index.train, index.val, 2, cfg, extractor=ex, hooks=hooks,
                on_epoch=lambda m: hooks.calls.append(f"on_epoch {m.epoch}"))
    assert hooks.calls == ["setup",
                           "start 0", "end 0", "on_epoch 0", "start 1", "end 1", "on_epoch 1", "round 0",
                           "start 2", "end 2", "on_epoch 2", "round 1", "start 3", "end 3", "on_epoch 3"]
    # training that stops in a round's last epoch does not end the round
    hooks = _Log()
    hooks.round_starts = (0, 1)
    train_model(source, index.train, index.val, 2, cfg, extractor=ex, hooks=hooks, deadline=time.monotonic() - 1)
    assert hooks.calls == ["setup", "start 0", "end 0"]


def test_best_epoch_copy_holds_only_what_training_changes():
    """A probe's early stopping copies the head, not the backbone; a fine-tune's its trainable stages."""
    from autotl.stages import TransferNet
    from autotl.train import changeable_state

    source = create_source_model("test_efficientnet=random")
    probe = TransferNet.from_source(source.model, 3, "all")
    assert set(changeable_state(probe)) == {"head.weight", "head.bias"}
    tune = TransferNet.from_source(source.model, 3, -1)
    keys = set(changeable_state(tune))
    last = f"stages.{tune.num_stages - 1}."
    assert any(k.startswith(last) for k in keys) and not any(k.startswith("stages.0.") for k in keys)
    # frozen stages stay in eval mode when the net is put in train mode (BN statistics never drift)
    tune.train()
    assert not tune.stages[0].training and tune.stages[-1].training and all(
        not m.training for m in tune.stages[0].modules())
    tune.eval()
    assert not any(m.training for m in tune.modules())
