"""What keeps a run's peak memory down: a frozen pass gives its onnxruntime session back when it ends,
and every onnxruntime or eager forward (the pass, the export's parity check) sees a few images at a time."""

from __future__ import annotations

import gc
import weakref

import onnxruntime as ort
import pytest
import torch

from autotl import backend, export
from autotl.data import scan_dataset
from autotl.features import FeatureExtractor
from autotl.models import create_source_model

from conftest import limited_torch_threads


@pytest.fixture(autouse=True)
def _one_thread():
    with limited_torch_threads(1):
        yield


class _Sessions:
    """Every onnxruntime session made, weakly, and the batch size of every run."""

    def __init__(self, monkeypatch):
        self.made: list[weakref.ref] = []
        self.batches: list[int] = []
        real = ort.InferenceSession
        spy = self

        class Spy(real):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                spy.made.append(weakref.ref(self))

            def run(self, output_names, feed, *args, **kwargs):
                spy.batches += [len(v) for v in feed.values()]
                return super().run(output_names, feed, *args, **kwargs)

        monkeypatch.setattr(ort, "InferenceSession", Spy)

    def alive(self) -> int:
        gc.disable()  # only what is still referenced counts: no collection can hide a leak or make one
        try:
            return sum(ref() is not None for ref in self.made)
        finally:
            gc.enable()


def test_a_frozen_pass_releases_its_session_and_feeds_small_batches(tmp_path, make_image_folder, monkeypatch):
    sessions = _Sessions(monkeypatch)
    index = scan_dataset(make_image_folder(tmp_path / "data", {"cat": 10, "dog": 10}), val_fraction=0.1)
    import autotl.features

    alive_at_trim = []
    monkeypatch.setattr(autotl.features, "trim_heap", lambda: alive_at_trim.append(sessions.alive()))
    ex = FeatureExtractor(create_source_model("test_efficientnet=random"), cache_dir=tmp_path / "cache", batch_size=16)
    acts = ex.extract(index.train, [1])
    assert ex.backend == "onnxruntime" and len(acts.pooled) == len(index.train)
    assert sessions.made, "the pass ran through onnxruntime"
    # the heap is trimmed after the pass, once its session is gone (else its arena stays resident)
    assert alive_at_trim == [0]
    assert sessions.alive() == 0, "the session (and its arena) outlived the pass"
    assert max(sessions.batches) <= backend.ORT_BATCH < ex.batch_size


def test_parity_check_runs_a_few_images_at_a_time(tmp_path, monkeypatch):
    import timm

    sessions = _Sessions(monkeypatch)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    path = export.export_onnx(model, tmp_path / "m.onnx", input_size=(3, 64, 64), exporter="torchscript")
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    report = export.verify_onnx(model, path, torch.randn(20, 3, 64, 64))
    assert report.passed and report.n_images == 20
    assert sum(seen) == 20 and max(seen) <= export.PARITY_BATCH < 20
    assert sum(sessions.batches) == 20 and max(sessions.batches) <= export.PARITY_BATCH
    assert sessions.alive() == 0



def test_run_releases_mapped_caches_and_reads_them_back(tmp_path, make_image_folder):
    """After the evaluation nothing reads the activation caches or the run's memory:
    ``Run.release_caches`` unmaps the caches (their pages count as resident while mapped) and empties
    the memory; a later read maps the disk cache again, with no forward."""
    import numpy as np

    from autotl.run import Run

    data = make_image_folder(tmp_path / "data", {"cat": 6, "dog": 6})
    run = Run.open(data, tmp_path / "run", models=["test_efficientnet=random"], cache_dir=tmp_path / "cache")
    ex = run.extractors["test_efficientnet"]
    before = ex.extract(run.index.train, [1])
    held = ex.extractor._memory
    assert any(isinstance(a, np.memmap) for arrays in held.values() for a in arrays.values())
    run.memory.get("something", lambda: object())
    batches = run.forward_batches()
    run.release_caches()
    assert not any(isinstance(a, np.memmap) for arrays in held.values() for a in arrays.values())
    assert len(run.memory) == 0
    again = ex.extract(run.index.train, [1])
    assert run.forward_batches() == batches
    assert torch.equal(again.pooled, before.pooled) and torch.equal(again.maps[1], before.maps[1])


def test_release_keeps_arrays_that_have_no_file_behind_them(tmp_path, make_image_folder):
    """Without a cache folder the arrays in memory are the only copy: releasing them would cost a
    forward on the next read, so they stay."""
    from autotl.run import Run

    data = make_image_folder(tmp_path / "data", {"cat": 6, "dog": 6})
    run = Run.open(data, tmp_path / "run", models=["test_efficientnet=random"])
    ex = run.extractors["test_efficientnet"]
    before = ex.extract(run.index.train)
    batches = run.forward_batches()
    run.release_caches()
    assert torch.equal(ex.extract(run.index.train).pooled, before.pooled)
    assert run.forward_batches() == batches


def _rss_file_kb() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("RssFile:"))


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_a_pass_writes_its_cache_files_without_holding_their_pages(tmp_path):
    """The rows a pass caches go to their files as writes, in any order, and are read back exactly; the
    pass's own resident memory does not grow with what it wrote (a writable map of the file would hold
    every written page until closed: 64 MB here)."""
    import contextlib

    import numpy as np

    from autotl.features import _Outputs

    n, shape = 1024, (16, 32, 32)  # float16: 32 KiB a row, 32 MiB in all
    rng = np.random.default_rng(0)
    values = rng.standard_normal((n, *shape)).astype(np.float32)
    order = np.concatenate([np.arange(0, 512), rng.permutation(np.arange(512, n))])
    with contextlib.ExitStack() as files:
        out = _Outputs(n, {"cut1": np.float16, "labels": np.int64},
                       {"cut1": tmp_path / "cut1.npy", "labels": tmp_path / "labels.npy"}, files)
        before = _rss_file_kb()
        for i in range(0, n, 64):
            rows = order[i:i + 64]
            out.put("cut1", rows, values[rows])
            out.put("labels", rows, rows * 3)
        grown_mb = (_rss_file_kb() - before) / 1024
        assert out.finish() == {}
    assert grown_mb < 8, f"the pass held {grown_mb:.0f} MB of written pages"
    assert np.array_equal(np.load(tmp_path / "cut1.npy"), values.astype(np.float16))
    assert np.array_equal(np.load(tmp_path / "labels.npy"), np.arange(n) * 3)
