"""Staged backbones, freezing, the activation cache and the training loop."""

import copy

import numpy as np
import pytest
import timm
import torch

from autotl.data import scan_dataset
from autotl.features import FeatureExtractor
from autotl.models import create_source_model
from autotl.stages import TransferNet, resolve_frozen, staged_backbone
from autotl.train import TrainConfig, TrainingHooks, classification_metrics, train_model
from conftest import limited_torch_threads


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["test_efficientnet", "resnet10t", "mobilenetv3_small_050"])
def test_stages_compose_to_the_models_features(name):
    model = timm.create_model(name).eval()
    stages, pool = staged_backbone(model)
    assert len(stages) > 2, "these families are split stage by stage"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = x
        for _, s in stages:
            y = s(y)
        assert torch.allclose(pool(y), model.forward_head(model.forward_features(x), pre_logits=True), atol=1e-5)


def test_resolve_frozen():
    assert resolve_frozen("all", 7) == 7 and resolve_frozen(None, 7) == 7
    assert resolve_frozen(-2, 7) == 5 and resolve_frozen(0, 7) == 0
    with pytest.raises(ValueError):
        resolve_frozen(8, 7)


def test_freezing_really_freezes():
    """Frozen stages get no gradient, keep their weights and their BN statistics in training."""
    model = timm.create_model("test_efficientnet")
    net = TransferNet.from_source(model, 3, frozen=3)
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    net.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 48, 48) * 3), torch.tensor([0, 1, 2, 0]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    for i in range(net.num_stages):
        names = [k for k in after if k.startswith(f"stages.{i}.")]
        changed = [k for k in names if not torch.equal(before[k], after[k])]
        if i < 3:
            assert not changed, f"frozen stage {i} changed: {changed[:3]}"  # weights and running stats
            assert all(p.grad is None for p in net.stages[i].parameters())
        else:
            assert changed, f"trainable stage {i} did not change"


def test_source_model_is_untouched_by_training(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 8, "b": 8}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    snapshot = copy.deepcopy(src.model.state_dict())
    train_model(src, index.train, index.val, 2, TrainConfig(frozen_stages=0, epochs=1, use_cache=False))
    assert all(torch.equal(snapshot[k], v) for k, v in src.model.state_dict().items())


def test_cache_hit_avoids_a_second_forward_pass(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 6, "b": 6}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    first = FeatureExtractor(src, cache_dir=tmp_path / "cache", batch_size=4)
    a = first.extract(index.train, [2])
    assert first.forward_batches == 3  # ceil(10 / 4)
    again = first.extract(index.train, [2])
    assert first.forward_batches == 3, "in-memory hit"
    fresh = FeatureExtractor(src, cache_dir=tmp_path / "cache", batch_size=4)  # a new process, same disk cache
    b = fresh.extract(index.train, [2])
    assert fresh.forward_batches == 0, "disk hit"
    assert torch.equal(a.pooled, b.pooled) and torch.equal(a.maps[2], b.maps[2]) and torch.equal(a.labels, again.labels)
    fresh.extract(index.train, [3])  # a cut not cached yet needs a pass
    assert fresh.forward_batches == 3
    fresh.extract(index.val, [])  # other files: another key
    assert fresh.forward_batches == 4


def test_a_full_fine_tune_reads_images_and_no_copy_of_the_input_is_cached(make_image_folder, tmp_path):
    """At cut 0 the frozen prefix is empty: "auto" caches nothing there (the cache would be a float copy
    of every input image per candidate, and the fine-tune would lose its augmentation), while a
    non-empty prefix is still cached; the search's scoring pass computes only the cached cuts."""
    from autotl.search._fit import prefix_cuts
    from autotl.search import load_recipe

    data = make_image_folder(tmp_path / "d", classes={"a": 6, "b": 6}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(src, cache_dir=tmp_path / "cache", batch_size=4)
    n = len(index.train) + len(index.val)
    full = train_model(src, index.train, index.val, 2, TrainConfig(frozen_stages=0, epochs=1), extractor=ex)
    last = train_model(src, index.train, index.val, 2, TrainConfig(frozen_stages=-1, epochs=1), extractor=ex)
    assert not full.cached and last.cached
    # the val images go through the suffix as activations at the cut; the training images do not
    assert [np.load(f, mmap_mode="r").shape[0] for f in (tmp_path / "cache").rglob("cut0.npy")] == [len(index.val)]
    recipe = load_recipe({"space": {"frozen_stages": [0, -1, "all"]}})
    assert prefix_cuts(recipe, ex, n, TrainConfig()) == [ex.num_stages - 1]
    forced = train_model(src, index.train, index.val, 2, TrainConfig(frozen_stages=0, epochs=1, use_cache=True), extractor=ex)
    assert forced.cached and len(list((tmp_path / "cache").rglob("cut0.npy"))) == 2  # asked for: still served


def test_cached_activations_equal_a_direct_forward(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 4, "b": 4}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(src, cache_dir=None)
    acts = ex.extract(index.train, [2])
    ds = __import__("autotl.features", fromlist=["ImageDataset"]).ImageDataset(index.train, ex.transform)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        logits = src.model(x)
        pooled = src.model.forward_head(src.model.forward_features(x), pre_logits=True)
    assert torch.allclose(acts.pooled, pooled, atol=1e-5)
    assert torch.allclose(acts.source_logits, logits, atol=1e-4)
    net = TransferNet.from_source(src.model, 2, frozen=2)
    with torch.no_grad():
        assert torch.allclose(acts.maps[2].float(), net.forward_prefix(x, 2), atol=2e-2)  # stored as fp16


def test_training_learns_and_is_reproducible(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 16, "b": 16, "c": 16}, size=(48, 48))
    index = scan_dataset(data, val_fraction=0.25)
    src = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(src, cache_dir=tmp_path / "cache")
    cfg = TrainConfig(frozen_stages=-2, epochs=6, lr=1e-2, patience=10)
    r1 = train_model(src, index.train, index.val, 3, cfg, extractor=ex)
    r2 = train_model(src, index.train, index.val, 3, cfg, extractor=ex)
    assert r1.cached and r1.history[-1].train_loss < r1.history[0].train_loss
    assert [h.val_loss for h in r1.history] == [h.val_loss for h in r2.history], "same seed, same run"
    seen = []
    train_model(src, index.train, index.val, 3, TrainConfig(frozen_stages="all", epochs=20, lr=0.05, patience=2),
                extractor=ex, on_epoch=seen.append)
    assert 2 < len(seen) <= 20  # early stopping or full run, callback sees every epoch


def test_training_from_images_without_cache(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 6, "b": 6}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    r = train_model(src, index.train, index.val, 2, TrainConfig(frozen_stages=2, epochs=2, use_cache=False))
    assert not r.cached and len(r.history) == 2


def test_non_finite_loss_raises(make_image_folder, tmp_path):
    data = make_image_folder(tmp_path / "d", classes={"a": 6, "b": 6}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    with pytest.raises(FloatingPointError):
        train_model(src, index.train, index.val, 2, TrainConfig(frozen_stages="all", epochs=2, lr=float("inf")))


def _forward_hook_count(net: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


class _NetWatcher(TrainingHooks):
    """Keeps the net train_model builds and counts its forward hooks at the end of every epoch."""

    def setup(self, run):
        self.net, self.during = run.net, []

    def end_epoch(self, metrics):
        self.during.append(_forward_hook_count(self.net))


def test_kd_hooks_are_removed_when_training_returns_or_raises(make_image_folder, tmp_path):
    """Feature-map KD hooks the trained stages; train_model must take them off before it hands the
    net back (the exported model would otherwise keep capturing maps), also when a callback raises."""
    data = make_image_folder(tmp_path / "d", classes={"a": 6, "b": 6}, size=(40, 40))
    index = scan_dataset(data)
    src = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(src, cache_dir=None)
    cfg = TrainConfig(frozen_stages=-1, epochs=2, batch_size=4, regularizer="kd", reg_lambda=0.1)
    watcher = _NetWatcher()
    res = train_model(src, index.train, index.val, 2, cfg, extractor=ex, hooks=watcher)
    assert res.history[0].lam == pytest.approx(0.1)  # KD was on
    assert watcher.during and all(n > 0 for n in watcher.during)  # ... with its hooks on the net while training
    assert res.net is watcher.net and _forward_hook_count(res.net) == 0

    def prune(metrics):
        raise RuntimeError("pruned")

    watcher = _NetWatcher()
    with pytest.raises(RuntimeError, match="pruned"):
        train_model(src, index.train, index.val, 2, cfg, extractor=ex, on_epoch=prune, hooks=watcher)
    assert watcher.during == [1] and _forward_hook_count(watcher.net) == 0


def test_classification_metrics():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    m = classification_metrics(logits, labels, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    # class 0: P=2/3 R=1 F1=0.8; class 1: P=1 R=0.5 F1=2/3
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)


def test_stop_epoch_follows_the_full_schedule_and_stops_where_asked(make_image_folder, tmp_path):
    """A refit trains the trial's schedule (same length, so the same learning rate at every step) and
    stops after the epoch the folds chose: the learning rate it ends at is mid-schedule, not zero."""
    index = scan_dataset(make_image_folder(tmp_path / "d", {"a": 8, "b": 8}, size=(40, 40)))
    source = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(source, cache_dir=None)
    rates = []

    class Rates(TrainingHooks):
        def setup(self, run):
            return None

        def end_epoch(self, metrics):
            rates.append(metrics.epoch)

    seen = {}
    import autotl.train as train_mod

    real = train_mod._warmup_cosine

    def spy(opt, total, warm, starts=(0,)):
        seen["total"] = total
        seen["opt"] = opt
        return real(opt, total, warm, starts)

    with limited_torch_threads(1), pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "_warmup_cosine", spy)
        cfg = TrainConfig(frozen_stages="all", epochs=6, batch_size=8, early_stopping=False, stop_epoch=2, warmup_epochs=0)
        res = train_model(source, index.train, index.val, 2, cfg, extractor=ex, hooks=Rates())
    assert len(res.history) == 2 and rates == [0, 1]
    steps_per_epoch = -(-len(index.train) // 8)
    assert seen["total"] == 6 * steps_per_epoch  # the schedule of 6 epochs, not a compressed one of 2
    lr_end = seen["opt"].param_groups[0]["lr"]
    assert 0.4 * cfg.lr < lr_end < 0.9 * cfg.lr  # a third of the way down the cosine, not at its end


def test_refit_trains_the_trials_schedule_up_to_their_chosen_epoch(monkeypatch):
    """The search's refit of a trained trial keeps its epoch count and stops after its median best epoch."""
    import types

    import autotl.search._fit as fit_mod

    captured = {}

    def fake_train(ctx, val, device=None):
        captured["cfg"] = ctx.config
        raise RuntimeError("stop here")

    monkeypatch.setattr(fit_mod, "train_strategy", fake_train)
    setup = types.SimpleNamespace(config=TrainConfig(frozen_stages=-1, epochs=6), source=None, extractor=None)
    objective = types.SimpleNamespace(setup=lambda params: setup, options={}, candidates=[])
    run = types.SimpleNamespace(index=types.SimpleNamespace(val=[], classes=["a", "b"]), run_dir=None, device="cpu",
                                memory=None)
    plan = types.SimpleNamespace(run=run, objective=objective)
    trial = types.SimpleNamespace(number=3, user_attrs={"best_epoch": 2})
    monkeypatch.setattr(fit_mod, "StrategyContext", lambda *a, **k: types.SimpleNamespace(config=a[4], notes={}))
    monkeypatch.setattr(fit_mod, "apply_strategies", lambda ctx, params: ctx)
    with pytest.raises(RuntimeError, match="stop here"):
        fit_mod._refit(plan, trial, {}, [])
    assert captured["cfg"].epochs == 6 and captured["cfg"].stop_epoch == 3 and not captured["cfg"].early_stopping
