"""The frozen-forward backends: onnxruntime agrees with PyTorch, is what CPU runs use, keys the cache,
falls back to eager when its graph is wrong; caches are memory-mapped."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from autotl import backend
from autotl._images import load_rgb
from autotl.data import scan_dataset
from autotl.features import FeatureExtractor, decode_workers
from autotl.models import create_source_model
from autotl.stages import staged_backbone


SPECS = ["test_efficientnet=random", "resnet10t=random"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def index(tmp_path, make_image_folder):
    return scan_dataset(make_image_folder(tmp_path / "data", {"cat": 6, "dog": 5}), val_fraction=0.2)


@pytest.mark.parametrize("spec", SPECS)
def test_onnxruntime_matches_pytorch_on_every_output(spec, index, tmp_path):
    source = create_source_model(spec)
    ort_ex = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4)
    eager_ex = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4, backend="eager")
    assert (ort_ex.backend, eager_ex.backend) == ("onnxruntime", "eager")
    cuts = [1, ort_ex.num_stages - 1]
    got, want = ort_ex.extract(index.train, cuts), eager_ex.extract(index.train, cuts)
    assert ort_ex.backend == "onnxruntime"  # it did not fall back
    assert list((tmp_path / "cache" / "graphs").glob("*.onnx")), "the frozen graph is cached beside the features"
    # the reference: the timm model itself, fp32 eager
    images = _images(ort_ex, index.train)
    with torch.no_grad():
        model = source.model.eval()
        pooled = model.forward_head(model.forward_features(images), pre_logits=True)
        logits = model.forward_head(model.forward_features(images))
    assert torch.max(torch.abs(got.pooled - pooled)) <= 1e-4
    assert torch.max(torch.abs(got.source_logits - logits)) <= 1e-4
    assert torch.max(torch.abs(got.pooled - want.pooled)) <= 1e-4
    for c in cuts:  # fp16 maps: equal up to one fp16 rounding step
        assert got.maps[c].shape == want.maps[c].shape
        assert torch.allclose(got.maps[c].float(), want.maps[c].float(), atol=1e-3, rtol=1e-3)


def test_graph_exported_once_and_reused(index, tmp_path):
    source = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4)
    ex.extract(index.train, [2])
    graphs = list((tmp_path / "cache" / "graphs").glob("*.onnx"))
    assert len(graphs) == 1
    stamp = graphs[0].stat().st_mtime_ns
    ex.extract(index.val, [2])  # other images, same (model, cut, input size): same graph file
    assert [g.stat().st_mtime_ns for g in (tmp_path / "cache" / "graphs").glob("*.onnx")] == [stamp]


def test_backend_is_part_of_the_cache_key(index, tmp_path):
    source = create_source_model("test_efficientnet=random")
    eager = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4, backend="eager")
    eager.extract(index.train, [1])
    again = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4, backend="eager")
    again.extract(index.train, [1])
    assert again.forward_batches == 0  # same backend: a cache hit
    fast = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4)
    fast.extract(index.train, [1])
    assert fast.forward_batches > 0  # another backend never reads the eager features


def test_a_wrong_graph_falls_back_to_eager(index, tmp_path):
    source = create_source_model("test_efficientnet=random")
    # a stale graph under this model's key (the same network with other weights): parity must reject it
    other = copy.deepcopy(source.model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05)
    stages, pool = staged_backbone(other)
    taps = list(range(1, len(stages)))  # the pass's intermediate-stage taps (FeatureExtractor.tap_cuts)
    key = backend.graph_key(source.label, source.input_id, source.data_config["input_size"], [], True, taps)
    stale = tmp_path / "cache" / "graphs" / f"{key}.onnx"
    backend.export_frozen_graph(backend._FrozenGraph([m for _, m in stages], pool, other.get_classifier(), [], taps),
                                stale, source.data_config["input_size"])
    ex = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4)
    acts = ex.extract(index.train)
    assert ex.backend == "eager"
    assert not stale.exists(), "a graph that failed parity is removed"
    assert ex._load(ex._key(index.train), "pooled") is not None, "the eager numbers are stored under the eager key"
    with torch.no_grad():
        want = source.model.eval().forward_head(source.model.forward_features(_images(ex, index.train)), pre_logits=True)
    assert torch.max(torch.abs(acts.pooled - want)) <= 1e-4


def _large_output_stages(scale: float) -> tuple[list[nn.Module], nn.Module]:
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU()),
              nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()), nn.Conv2d(64, 64, 3, padding=1)]
    with torch.no_grad():
        for m in stages:
            conv = m[0] if isinstance(m, nn.Sequential) else m
            conv.weight.mul_(scale)
    return stages, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def _frozen(stages, pool, graph_dir):
    return backend.frozen_forward(stages, pool, None, [1], backend="onnxruntime", device=torch.device("cpu"),
                                  input_size=(3, 32, 32), label="large", weights_id="w", graph_dir=graph_dir)


def test_parity_bound_is_relative_to_the_output_scale(tmp_path):
    # outputs in the thousands: float32 rounding alone differs by more than PARITY_ATOL in absolute terms
    stages, pool = _large_output_stages(30.0)
    runner = _frozen(stages, pool, tmp_path)
    assert isinstance(runner, backend.OrtForward), "a correct graph with large outputs keeps onnxruntime"
    graph = backend._FrozenGraph(stages, pool, None, [1])
    x = torch.randn((2, 3, 32, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = graph.eval()(x)
    got = runner(x)
    assert max(float(np.max(np.abs(got[n] - w.numpy()))) for n, w in zip(runner.names, want)) > backend.PARITY_ATOL
    assert backend.parity(runner, graph, (3, 32, 32)) <= backend.PARITY_ATOL


def test_parity_still_rejects_a_slightly_wrong_graph_with_large_outputs(tmp_path):
    stages, pool = _large_output_stages(30.0)
    assert isinstance(_frozen(stages, pool, tmp_path), backend.OrtForward)
    (graph_file,) = tmp_path.glob("*.onnx")
    with torch.no_grad():
        stages[2].weight[0].mul_(1.01)  # one output channel's weights off by 1%: the cached graph is now stale
    assert isinstance(_frozen(stages, pool, tmp_path), backend.EagerForward)
    assert not graph_file.exists(), "a graph that failed parity is removed"


def _images(ex, samples):
    return torch.stack([ex.transform(load_rgb(s.path)) for s in samples])


def test_caches_are_memory_mapped(index, tmp_path):
    source = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4)
    first = ex.extract(index.train, [2])
    fresh = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=4)
    again = fresh.extract(index.train, [2])
    assert fresh.forward_batches == 0
    key = fresh._key(index.train)
    assert isinstance(fresh._load(key, "cut2"), np.memmap)
    assert isinstance(ex._load(key, "cut2"), np.memmap), "the pass itself leaves a mapped file, not an in-memory copy"
    assert torch.equal(first.maps[2], again.maps[2])
    assert not list((tmp_path / "cache").rglob("*.tmp")), "no temporary file left behind"


def test_without_cache_dir_arrays_stay_in_memory(index):
    ex = FeatureExtractor(create_source_model("test_efficientnet=random"), batch_size=4)
    acts = ex.extract(index.train, [1])
    assert ex.backend == "onnxruntime" and acts.pooled.shape[0] == len(index.train)
    assert not isinstance(ex._load(ex._key(index.train), "cut1"), np.memmap)


def test_backend_choice():
    assert backend.pick_backend(torch.device("cpu")) == "onnxruntime"
    assert backend.pick_backend(torch.device("cpu"), "eager") == "eager"
    assert backend.pick_backend(torch.device("cuda")) == "cuda-bf16"
    assert decode_workers(torch.device("cpu")) == (max(1, backend.cpu_cores() // 4) if backend.cpu_cores() > 1 else 0)


def test_backend_override_is_checked(monkeypatch):
    from autotl.errors import AutotlError

    monkeypatch.setenv("AUTOTL_FROZEN_BACKEND", "tensorrt")
    with pytest.raises(AutotlError, match="AUTOTL_FROZEN_BACKEND"):
        backend.pick_backend(torch.device("cpu"))


def test_the_pass_decodes_in_worker_processes_sized_to_the_cores(index, monkeypatch):
    import autotl.features as features

    used = []
    real = features.make_loader

    def spy(*args, **kwargs):
        loader = real(*args, **kwargs)
        used.append(loader.num_workers)
        return loader

    monkeypatch.setattr(features, "make_loader", spy)
    monkeypatch.setattr(features, "decode_workers", lambda device: 2)
    FeatureExtractor(create_source_model("test_efficientnet=random"), batch_size=4).extract(index.train)
    assert used == [2]


def test_a_second_backbone_and_the_flipped_view_read_the_decoded_pixels_not_the_files(index, tmp_path, monkeypatch):
    """A run's extractors share one ``DecodedImages``: the first pass decodes each image once, every
    later pass (another backbone, the flip view) reads its pixels, with bit-identical features."""
    from autotl import features
    from autotl.features import DecodedImages
    from autotl.models import shared_input_config

    sources = [create_source_model(s) for s in SPECS]
    shared = shared_input_config([s.data_config for s in sources])
    for s in sources:
        s.share_input(shared)
    decodes = []
    real = features.load_rgb
    monkeypatch.setattr(features, "load_rgb", lambda path, **kw: decodes.append(path) or real(path, **kw))
    monkeypatch.setattr(features, "decode_workers", lambda policy: 0)  # decodes in this process, where they are counted
    store = DecodedImages(tmp_path / "shared")
    together = [FeatureExtractor(s, cache_dir=tmp_path / "shared", batch_size=4, decoded=store) for s in sources]
    got = {(s.label, view): ex.extract(index.train, view=view).pooled
           for view in ("center", "flip") for s, ex in zip(sources, together)}
    n = len(index.train)
    assert len(decodes) == n and store.decoded == n  # one decode per image for 2 backbones x 2 views
    alone = [FeatureExtractor(s, cache_dir=tmp_path / f"alone{i}", batch_size=4) for i, s in enumerate(sources)]
    for s, ex in zip(sources, alone):
        for view in ("center", "flip"):
            assert torch.equal(got[(s.label, view)], ex.extract(index.train, view=view).pooled)
    assert len(decodes) == n + 2 * 2 * n  # without the store every pass decodes again
    folder = store.folder
    store.close()
    assert not folder.exists()
