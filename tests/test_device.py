"""The device policy (``autotl.device``): every device decision a CUDA run makes, exercised on the CPU.

A policy with CUDA's settings (bf16 autocast, channels_last, decoder workers, pinned memory,
prefetch, persistent workers, batches sized from memory, timing at the training batch) runs here on
the CPU; each test fails when a setting stops reaching the code that should obey it. What only a GPU
can show (the device itself: kernels, synchronisation, memory figures) is ``bench/gpu.py``'s.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import autotl.features as features
import autotl.train as train_mod
from autotl.device import (DevicePolicy, activation_bytes_per_image, as_policy, batch_size_for_memory, configure_torch,
                           resolve_policy)
from autotl.features import FeatureExtractor
from autotl.stages import TransferNet
from autotl.train import TrainConfig, TrainingHooks, train_model
from conftest import tiny_training_setup

CPU = torch.device("cpu")
# CUDA's settings on the CPU; pinned memory off (a CPU-only torch warns on every pinned batch)
CUDA_LIKE = resolve_policy("cpu", settings_for="cuda", cores=3, memory_bytes=None)
# the same assertions on a real GPU where there is one (``bench/gpu.py`` runs this file there)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
POLICIES = [pytest.param("cuda-like", id="cuda-like"), pytest.param("cuda", id="cuda", marks=needs_cuda)]


def _policy(name: str) -> DevicePolicy:
    return CUDA_LIKE if name == "cuda-like" else resolve_policy("cuda", cores=3)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_training_setup(tmp_path_factory.mktemp("device") / "d")


class _Seen:
    """Forward pre-hooks on every stage of the nets ``TransferNet.from_source`` builds: the dtype,
    memory format and train/eval mode of what each stage receives and returns."""

    def __init__(self, monkeypatch):
        self.rows: list[dict] = []
        real = TransferNet.from_source

        def spy(cls, *args, **kwargs):
            net = real(*args, **kwargs)
            for i, stage in enumerate(net.stages):
                stage.register_forward_hook(self._record(i))
            net.head.register_forward_hook(self._record("head"))
            return net

        monkeypatch.setattr(TransferNet, "from_source", classmethod(spy))

    def _record(self, where):
        def hook(m, inp, out):
            x = inp[0]
            self.rows.append({"where": where, "training": m.training, "out": out.dtype,
                              "cl_in": x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)
                              and not x.is_contiguous()})
        return hook

    def at(self, where, training=None):
        return [r for r in self.rows if r["where"] == where and (training is None or r["training"] == training)]


# ------------------------------------------------------------------------------------------ resolution
def test_cuda_settings_on_any_device():
    p = resolve_policy("cpu", settings_for="cuda", cores=16, memory_bytes=8 << 30)
    assert p.device == CPU and p.amp_dtype == torch.bfloat16 and p.channels_last
    assert (p.loader_workers, p.decode_workers) == (15, 15)  # every core but the feeding one decodes
    assert p.prefetch_factor == 4 and p.persistent_workers and p.time_at_train_batch and p.memory_bytes == 8 << 30
    assert not p.pin_memory  # page-locking only helps a copy to an accelerator
    assert p.eager_name == "cpu-bf16" and p.needs_eager


@pytest.mark.parametrize("cores, loader, decode", [(1, 0, 0), (2, 1, 1), (16, 1, 4)])
def test_cpu_settings(cores, loader, decode):
    p = resolve_policy("cpu", cores=cores)
    assert (p.loader_workers, p.decode_workers) == (loader, decode)
    assert p.amp_dtype is None and not p.channels_last and not p.pin_memory and p.memory_bytes is None
    assert p.eager_name == "eager" and not p.needs_eager and not p.time_at_train_batch


def test_cuda_device_resolution(monkeypatch):
    """What ``resolve_policy("cuda")`` asks the GPU: bf16 support and free memory."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = resolve_policy("cuda", cores=8)  # no GPU: nothing to ask, CUDA's defaults
    assert p.device.type == "cuda" and p.pin_memory and p.amp_dtype == torch.bfloat16 and p.memory_bytes is None
    assert p.eager_name == "cuda-bf16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 << 30, 16 << 30))
    old = resolve_policy("cuda", cores=8)
    assert old.amp_dtype is None and old.memory_bytes == 6 << 30  # pre-Ampere: fp32, no loss scaling needed
    assert old.eager_name == "cuda-fp32"


def test_auto_picks_cuda_when_present(monkeypatch):
    assert resolve_policy("auto").device == (torch.device("cuda") if torch.cuda.is_available() else CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 30, 2 << 30))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_policy("auto").device.type == "cuda"


def test_as_policy_keeps_the_runs_policy_on_its_device():
    run = dataclasses.replace(CUDA_LIKE, loader_workers=5)
    assert as_policy(run) is run
    assert as_policy(CPU, run) is run and as_policy("cpu", run) is run
    if not torch.cuda.is_available():
        assert as_policy(None, run) is run  # auto: the CPU here
    other = as_policy("cuda", run)  # another device: that device's own settings
    assert other.device.type == "cuda" and other is not run
    assert as_policy("cuda:0", dataclasses.replace(run, device=torch.device("cuda"))).loader_workers == 5


@pytest.mark.parametrize("free, per_image, want", [
    (8 << 30, 10 << 20, 256),  # 0.5 × 8 GiB / 10 MiB = 409 images → 256
    (80 << 30, 10 << 20, 512),  # capped: the decoders could not keep up
    (1 << 30, 10 << 20, 32),  # 51 → 32
    (10 << 20, 30 << 20, 1),  # not even one fits: the smallest batch
])
def test_batch_size_from_free_memory(free, per_image, want):
    assert batch_size_for_memory(free, per_image) == want


def test_batch_size_bounds():
    assert batch_size_for_memory(1 << 30, 1 << 20, high=64) == 64
    assert batch_size_for_memory(10 << 20, 30 << 20, low=8) == 8
    p = DevicePolicy(CPU, memory_bytes=8 << 30)
    assert p.frozen_batch(64, 10 << 20) == 256 and p.frozen_batch(512, 10 << 20) == 512  # never below the asked
    assert DevicePolicy(CPU).frozen_batch(64, 10 << 20) == 64  # no memory figure: as asked
    # one worker decodes a whole batch: small passes keep every decoder busy, two batches each
    fed = DevicePolicy(CPU, memory_bytes=8 << 30, decode_workers=15)
    assert fed.frozen_batch(16, 10 << 20, n_images=2048) == 64 and fed.frozen_batch(16, 10 << 20, n_images=10**5) == 256


def test_activation_bytes_count_every_layer_output():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten())
    per_value = 8 * 10 * 10  # each of the three layers outputs 800 values for a 10×10 image
    assert activation_bytes_per_image(net, (3, 10, 10), 2) == 3 * per_value * 2
    assert net.training  # the probe's eval() does not stick


def test_autocast_context():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with CUDA_LIKE.autocast():
        assert (a @ b).dtype == torch.bfloat16
    with resolve_policy("cpu").autocast():
        assert (a @ b).dtype == torch.float32


def test_module_and_release_memory_format():
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    CUDA_LIKE.module(net)
    assert net[0].weight.is_contiguous(memory_format=torch.channels_last) and not net[0].weight.is_contiguous()
    CUDA_LIKE.release(net)
    assert net[0].weight.is_contiguous()
    assert CUDA_LIKE.format_input(torch.zeros(2, 3, 4, 4)).is_contiguous(memory_format=torch.channels_last)
    assert CUDA_LIKE.format_input(torch.zeros(2, 3)).shape == (2, 3)


def test_configure_torch_switches_cuda_autotuning():
    before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = False, False
        configure_torch(resolve_policy("cpu"))
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        configure_torch(DevicePolicy(torch.device("cuda")))
        assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = before


# ------------------------------------------------------------------------------------------ loaders
@pytest.mark.filterwarnings("ignore:.*pin_memory.*")
def test_loader_takes_the_policys_settings():
    ds = torch.utils.data.TensorDataset(torch.zeros(8, 2))
    p = DevicePolicy(CPU, loader_workers=3, pin_memory=True, prefetch_factor=5, persistent_workers=True)
    dl = features.make_loader(ds, batch_size=2, shuffle=True, device=p, persistent=True)
    assert (dl.num_workers, dl.pin_memory, dl.prefetch_factor, dl.persistent_workers) == (3, True, 5, True)
    assert not features.make_loader(ds, batch_size=2, shuffle=False, device=p).persistent_workers  # not asked
    none = features.make_loader(ds, batch_size=2, shuffle=False, device=p, workers=0, persistent=True)
    assert none.num_workers == 0 and not none.persistent_workers  # nothing to keep alive


class _Extra(TrainingHooks):
    """Extra rows that may change between epochs: workers must not keep a stale copy."""

    def setup(self, run):
        size = run.extractor.source.data_config["input_size"]
        self.rows = torch.utils.data.TensorDataset(torch.randn(len(run.train_labels), *size),
                                                   torch.zeros(len(run.train_labels), dtype=torch.long))
        self.head = nn.Linear(run.net.head.in_features, 2)
        return self.head

    def extra_dataset(self):
        return self.rows

    def extra_loss(self, features, labels):
        return nn.functional.cross_entropy(self.head(features), labels)


@pytest.mark.parametrize("use_cache, hooks", [(False, None), (True, None), (False, _Extra)])
def test_training_loader_follows_the_policy(setup, monkeypatch, use_cache, hooks):
    index, source, ex = setup
    made = []
    real = train_mod.make_loader

    def spy(*args, **kwargs):
        dl = real(*args, **kwargs)
        made.append(dl)
        return dl

    monkeypatch.setattr(train_mod, "make_loader", spy)
    policy = dataclasses.replace(CUDA_LIKE, loader_workers=2, prefetch_factor=3)
    cfg = TrainConfig(frozen_stages=0, epochs=1, batch_size=8, use_cache=use_cache)
    train_model(source, index.train, index.val, 2, cfg, extractor=ex, device=policy,
                hooks=hooks() if hooks else None)
    (dl,) = made
    if use_cache:  # activations already in memory: no worker would help
        assert dl.num_workers == 0 and not dl.persistent_workers
    else:
        assert (dl.num_workers, dl.prefetch_factor) == (2, 3)
        assert dl.persistent_workers == (hooks is None)


def test_persistent_workers_end_with_the_training_run(setup):
    """A pruned trial raises out of the loop; its traceback must not keep the decoders alive."""
    import multiprocessing

    index, source, ex = setup
    before = set(multiprocessing.active_children())

    def prune(metrics):
        raise RuntimeError("pruned")

    policy = dataclasses.replace(CUDA_LIKE, loader_workers=1)
    cfg = TrainConfig(frozen_stages=0, epochs=2, batch_size=8, use_cache=False)
    with pytest.raises(RuntimeError, match="pruned") as raised:
        train_model(source, index.train, index.val, 2, cfg, extractor=ex, device=policy, on_epoch=prune)
    assert raised.traceback  # still held here, as a study's bookkeeping may hold it
    assert set(multiprocessing.active_children()) <= before


def test_frozen_pass_decodes_with_the_policys_workers(setup, monkeypatch):
    index, source, _ = setup
    used = []
    real = features.make_loader

    def spy(*args, **kwargs):
        dl = real(*args, **kwargs)
        used.append((dl.num_workers, dl.prefetch_factor))
        return dl

    monkeypatch.setattr(features, "make_loader", spy)
    FeatureExtractor(source, device=dataclasses.replace(CUDA_LIKE, decode_workers=2, prefetch_factor=3),
                     cache_dir=None, batch_size=8).extract(index.train)
    assert used == [(2, 3)]


# ------------------------------------------------------------------------------------------ frozen pass
@pytest.mark.parametrize("which", POLICIES)
def test_frozen_pass_under_the_policy(setup, which):
    index, source, _ = setup
    policy = _policy(which)
    seen = []

    def record(m, i, o):
        if len(o) > 1:  # the pass's batches (the cache's size probe runs one image)
            seen.append((o.dtype, i[0].is_contiguous(memory_format=torch.channels_last) and not i[0].is_contiguous()))

    def hooked(ex):
        for _, stage in ex.stages:
            for m in stage.modules():
                if isinstance(m, nn.Conv2d) and not m._forward_hooks:
                    m.register_forward_hook(record)
        return ex

    fp32 = FeatureExtractor(source, cache_dir=None, batch_size=8, backend="eager")
    bf16 = FeatureExtractor(source, device=policy, cache_dir=None, batch_size=8)
    want = hooked(fp32).extract(index.train, [1])
    assert seen and all(dt == torch.float32 and not cl for dt, cl in seen)
    seen.clear()
    got = hooked(bf16).extract(index.train, [1])
    assert bf16.backend == policy.eager_name and seen and all(dt == torch.bfloat16 for dt, _ in seen)
    assert sum(cl for _, cl in seen) >= len(seen) // 2  # channels_last inputs (not the 1×1 maps)
    assert bf16._key(index.train) != fp32._key(index.train)  # bf16 numbers never served as fp32 ones
    assert not torch.equal(got.pooled, want.pooled)
    torch.testing.assert_close(got.pooled, want.pooled, rtol=0.1, atol=0.1)
    # the pass gives its modules back as export and onnxruntime want them: on the CPU, contiguous
    assert all(p.is_contiguous() and p.device == CPU for _, st in bf16.stages for p in st.parameters())


def test_frozen_pass_batches_sized_from_free_memory(setup):
    index, source, _ = setup
    n = len(index.train)

    def batches(**changes):
        ex = FeatureExtractor(source, device=dataclasses.replace(CUDA_LIKE, **changes), cache_dir=None, batch_size=2)
        ex.extract(index.train)
        return ex.forward_batches

    assert batches() == -(-n // 2)  # no memory figure: the batch asked for
    assert batches(memory_bytes=8 << 30, decode_workers=0) == 1  # decoded in the loop: one batch of everything
    fed = 1 << ((n // 2).bit_length() - 1)  # one decoder: the largest power of two giving it two batches
    assert fed > 2 and batches(memory_bytes=8 << 30, decode_workers=1) == -(-n // fed)
    assert batches(memory_bytes=1 << 10, decode_workers=0) == -(-n // 2)  # never below the batch asked for


# ------------------------------------------------------------------------------------------ training
@pytest.mark.parametrize("which", POLICIES)
@pytest.mark.parametrize("frozen, use_cache", [(0, False), (1, False), (1, True)])
def test_training_runs_under_the_policys_autocast_and_format(setup, monkeypatch, frozen, use_cache, which):
    """Full fine-tune on decoded images, a frozen prefix on decoded images, a cached prefix: the
    trainable stages see channels_last input and compute in bf16, in training and in validation."""
    index, source, ex = setup
    seen = _Seen(monkeypatch)
    cfg = TrainConfig(frozen_stages=frozen, epochs=1, batch_size=8, use_cache=use_cache)
    policy = _policy(which)
    ex = ex if which == "cuda-like" else FeatureExtractor(source, device=policy, cache_dir=None)
    res = train_model(source, index.train, index.val, 2, cfg, extractor=ex, device=policy)
    assert res.cached == use_cache
    for training in (True, False):
        rows = seen.at(frozen, training)
        assert rows and all(r["out"] == torch.bfloat16 and r["cl_in"] for r in rows), (training, rows[:2])
        assert all(r["out"] == torch.bfloat16 for r in seen.at("head", training))
    if frozen and not use_cache:  # the frozen prefix runs under autocast too
        assert all(r["out"] == torch.bfloat16 for r in seen.at(0))
    # handed back as export wants it: CPU, fp32, contiguous
    assert all(p.is_contiguous() and p.dtype == torch.float32 and p.device == CPU for p in res.net.parameters())
    assert np.isfinite(res.best.val_loss)


def test_default_cpu_training_stays_fp32(setup, monkeypatch):
    index, source, ex = setup
    seen = _Seen(monkeypatch)
    cfg = TrainConfig(frozen_stages=0, epochs=1, batch_size=8, use_cache=False)
    train_model(source, index.train, index.val, 2, cfg, extractor=ex, device="cpu")
    rows = seen.at(0)
    assert rows and all(r["out"] == torch.float32 and not r["cl_in"] for r in rows)


def test_training_takes_the_extractors_policy(setup, monkeypatch):
    """The run's policy travels with its extractors: a trial given only the device runs by it."""
    index, source, _ = setup
    ex = FeatureExtractor(source, device=CUDA_LIKE, cache_dir=None)
    seen = _Seen(monkeypatch)
    train_model(source, index.train, index.val, 2, TrainConfig(frozen_stages=1, epochs=1, batch_size=8), extractor=ex,
                device=torch.device("cpu"))
    assert seen.at(1) and all(r["out"] == torch.bfloat16 for r in seen.at(1))


@pytest.mark.parametrize("regularizer, extra", [("l2sp", {"reg_lambda": 0.5, "reg_beta": 0.05, "reg_decay": 0.8}),
                                               ("kd", {"reg_lambda": 0.05})])
def test_regularisers_with_dtnh_under_bf16_and_channels_last(setup, regularizer, extra):
    """L2-SP and KD with DTNH's projection on channels_last weights and bf16 feature maps."""
    index, source, ex = setup
    cfg = TrainConfig(frozen_stages=-2, epochs=3, batch_size=4, lr=0.05, regularizer=regularizer, dtnh=True,
                      early_stopping=False, label_smoothing=0.0, **extra)
    res = train_model(source, index.train, index.val, 2, cfg, extractor=ex, device=CUDA_LIKE)
    assert all(np.isfinite(h.train_loss) for h in res.history)
    assert any(h.projected_fraction > 0 for h in res.history)  # DTNH's branch ran on these gradients


def test_joint_round_end_classifies_under_the_policy(setup):
    from autotl.retrieval.joint import _probs_cached

    _, source, _ = setup
    net = TransferNet.from_source(source.model, 3, 1)
    with torch.no_grad():
        maps = net.forward_prefix(torch.randn(5, 3, 40, 40), 1)
    dtypes = []
    net.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    probs = _probs_cached(net, maps, 1, CUDA_LIKE)
    assert dtypes == [torch.bfloat16] and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(5))


# ------------------------------------------------------------------------------------------ run + cost model
def test_run_keeps_one_policy(tmp_path, make_image_folder):
    from autotl.run import Run

    data = make_image_folder(tmp_path / "data", {"a": 4, "b": 4}, size=(32, 32))
    run = Run.open(data, tmp_path / "run", models=["test_efficientnet=random"], device=CUDA_LIKE,
                   cache_dir=tmp_path / "cache")
    assert run.policy is CUDA_LIKE and run.device == CPU
    assert all(ex.policy is CUDA_LIKE for ex in run.extractors.values())
    plain = Run.open(data, tmp_path / "run2", models=["test_efficientnet=random"], device="cpu",
                     cache_dir=tmp_path / "cache")
    assert plain.policy == resolve_policy("cpu")


def test_cost_model_times_as_the_trials_run(tmp_path, make_image_folder, monkeypatch):
    import autotl.search._cost as cost_mod
    from autotl.run import Run
    from autotl.search._folds import plan_selection
    from autotl._recipe import parse_recipe

    waits = []

    class Counting(DevicePolicy):
        """Counts the waits for the device (a CUDA policy synchronises there)."""

        def synchronize(self) -> None:
            waits.append(1)

    data = make_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=(32, 32))
    policy = Counting(**{f.name: getattr(dataclasses.replace(CUDA_LIKE, loader_workers=4), f.name)
                          for f in dataclasses.fields(DevicePolicy)})
    run = Run.open(data, tmp_path / "run", models=["test_efficientnet=random"], device=policy,
                   cache_dir=tmp_path / "cache")
    seen = _Seen(monkeypatch)
    batches = []
    monkeypatch.setattr(cost_mod, "_timed", lambda fn: (fn(), 1.0)[1])  # decoding 4 images "takes" 1 s
    real = cost_mod._stage_seconds
    monkeypatch.setattr(cost_mod, "_stage_seconds",
                        lambda net, images, p: (batches.append(len(images)), real(net, images, p))[1])
    recipe = parse_recipe({"space": {"frozen_stages": ["all", 0]}}, "t")
    cost = cost_mod.measure_costs(run, recipe, TrainConfig(batch_size=16), plan_selection(run.index, k=2, repeats=1))
    assert set(batches) == {16}  # a GPU's per-image time depends on the batch: timed at the training one
    stages = [r for r in seen.rows if r["where"] == 0]
    assert stages and all(r["out"] == torch.bfloat16 for r in seen.rows) and all(r["cl_in"] for r in stages)
    n = len({r["where"] for r in seen.rows} - {"head"})
    assert len(waits) == len(batches) * (2 * n + 1)  # around every timed stage, after the head
    assert cost.decode == pytest.approx(1.0 / 4 / 4)  # four decoding workers share the work
