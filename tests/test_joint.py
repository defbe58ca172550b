"""Selective joint fine-tuning: the source pool, the joint step, the hard-sample rounds and
the ``retrieval`` strategy end to end (tiny random-weight timm model, generated image folders)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from autotl.data import scan_dataset
from autotl.errors import AutotlError
from autotl.features import FeatureExtractor
from autotl.models import create_source_model
from autotl.retrieval import (
    JointData,
    fit_bin_edges,
    gabor_filter_bank,
    histograms,
    joint_step_loss,
    load_images,
    pool_class_weights,
    retrieval_stats,
    scan_pool,
    train_joint,
)
from autotl.retrieval import joint as joint_mod
from autotl.retrieval.joint import JointFineTuningHooks, _source_head, round_boundaries, smoothing_entropy
from autotl.retrieval.schedule import HardSampleSchedule
from autotl.retrieval.strategy import SelectiveJointFineTuning
from autotl.stages import SuffixView, TransferNet
from autotl.strategy import STRATEGIES, StrategyContext, apply_strategies, train_strategy
from autotl import train as train_mod
from autotl.train import TrainConfig, TrainingHooks, round_lr_factor, train_model
from conftest import limited_torch_threads

MODEL = "test_efficientnet@64=random"
POOL_CLASSES = {"n01440764": 8, "n02102040": 8, "other": 6}  # two ImageNet wnids + one other class


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    with limited_torch_threads(2):
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("joint")
    data = write_image_folder(root / "data", {"cat": [10, 4], "dog": [10, 4]}, splits=["train", "val"])
    pool = write_image_folder(root / "pool", POOL_CLASSES, ext=".jpg", seed=7)
    (pool / "other" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return data, pool


@pytest.fixture(scope="module")
def source():
    return create_source_model(MODEL)


@pytest.fixture(scope="module")
def index(folders):
    return scan_dataset(folders[0])


@pytest.fixture(scope="module")
def extractor(source):
    """One extractor (in-memory activation cache) for the tests that train: target activations once."""
    return FeatureExtractor(source)


# ------------------------------------------------------------------ the pool


def test_scan_pool_classes_wnids_and_skipped(folders, tmp_path, monkeypatch):
    _, root = folders
    pool = scan_pool(root, cache_dir=tmp_path)
    assert pool.classes == sorted(POOL_CLASSES)
    assert len(pool) == sum(POOL_CLASSES.values())
    assert [(p.name, r) for p, r in pool.skipped] == [("broken.jpg", "not an image")]
    assert pool.imagenet_index == [0, 217, None]  # tench, English springer; 'other' is no wnid
    assert not pool.is_imagenet
    # the decode check is cached: an unchanged pool is only listed and stat'ed
    monkeypatch.setattr("autotl.retrieval.pool.check_image", lambda p: (_ for _ in ()).throw(AssertionError("decoded")))
    again = scan_pool(root, cache_dir=tmp_path)
    assert again.samples == pool.samples and again.skipped == pool.skipped
    with pytest.raises(AutotlError, match="--source-pool .*does not exist"):
        scan_pool(tmp_path / "nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(AutotlError, match="no images"):
        scan_pool(tmp_path / "empty")


def test_datl_class_weights_map_wnids_and_keep_mean_one(folders, tmp_path):
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    p_t = np.full(1000, 0.5 / 998)  # P_t over ImageNet; P_s is the pool's (8, 8, 6) images (tests/test_datl_weights.py)
    p_t[0], p_t[217] = 0.1, 0.4
    cw, info = pool_class_weights(pool, p_t)
    assert info["matched_classes"] == 2
    counts = np.bincount(pool.labels, minlength=3)
    assert float((cw * counts).sum() / counts.sum()) == pytest.approx(1.0)
    assert cw[1] / cw[0] == pytest.approx(4.0) and cw[2] == pytest.approx(1.0)  # other: unmatched -> 1


# ------------------------------------------------------------------ the joint step


def test_joint_step_updates_each_head_only_from_its_own_domain(source):
    torch.manual_seed(0)
    net = TransferNet.from_source(source.model, 2, -2)  # the last two stages shared and trainable
    head_s = torch.nn.Linear(net.head.in_features, 5)
    view = SuffixView(net, net.frozen, head_s)  # what train_model trains: the source head as its extra module
    a = net.forward_prefix(torch.randn(8, 3, 64, 64), net.frozen).detach()
    xt, xs = a[:4], a[4:]
    yt, ys = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 4, 2, 3])
    shared = [p for _, p in net.shared_parameters()]
    assert shared

    def grads(x, n_target, y_t, y_s, weight=1.0):
        view.zero_grad(set_to_none=True)
        loss, _, _ = joint_step_loss(view(x), n_target, y_t, y_s, net.head, head_s, source_weight=weight)
        loss.backward()
        clone = lambda ps: [None if p.grad is None else p.grad.clone() for p in ps]  # noqa: E731
        return clone(net.head.parameters()), clone(head_s.parameters()), clone(shared)

    view.train()
    t_head, s_head, t_shared = grads(xt, 4, yt, ys[:0])  # target images only
    assert all(g is not None and g.abs().sum() > 0 for g in t_head)
    assert all(g is None for g in s_head)
    assert any(g is not None and g.abs().sum() > 0 for g in t_shared)
    t_head, s_head, s_shared = grads(xs, 0, yt[:0], ys)  # pool images only
    assert all(g is None for g in t_head)
    assert all(g is not None and g.abs().sum() > 0 for g in s_head)
    assert any(g is not None and g.abs().sum() > 0 for g in s_shared)

    # a mixed batch: each head's gradient is exactly the one its own half gives (eval mode, so the
    # batch-norm statistics do not couple the halves); the shared stages get the sum of both
    view.eval()
    t_only, _, sh_t = grads(xt, 4, yt, ys[:0])
    _, s_only, sh_s = grads(xs, 0, yt[:0], ys, weight=0.5)
    t_mix, s_mix, sh_mix = grads(torch.cat([xt, xs]), 4, yt, ys, weight=0.5)
    for a_, b_ in zip(t_mix, t_only):
        torch.testing.assert_close(a_, b_)
    for a_, b_ in zip(s_mix, s_only):
        torch.testing.assert_close(a_, b_)
    for m, g1, g2 in zip(sh_mix, sh_t, sh_s):
        if m is not None:
            torch.testing.assert_close(m, (0 if g1 is None else g1) + (0 if g2 is None else g2), atol=1e-6, rtol=1e-4)


def test_source_head_starts_from_imagenet_rows_for_wnid_classes(source, folders, tmp_path):
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    net = TransferNet.from_source(source.model, 2, -1)
    head, how = _source_head(net, source, pool, "imagenet", 0)
    cls = source.model.get_classifier()
    assert how.startswith("imagenet rows (2/3")
    torch.testing.assert_close(head.weight[0], cls.weight[0])
    torch.testing.assert_close(head.weight[1], cls.weight[217])
    assert not torch.equal(head.weight[2], cls.weight[2])
    assert _source_head(net, source, pool, "random", 0)[1] == "random"


# ------------------------------------------------------------------ hard-sample rounds


def test_round_boundaries_scale_to_the_budget():
    assert round_boundaries(15, 5) == [0, 3, 6, 9, 12]
    assert round_boundaries(3, 5) == [0, 1, 2]
    assert round_boundaries(7, 5) == [0, 1, 2, 4, 5]
    assert round_boundaries(1, 5) == [0]


def test_hard_sample_rounds_grow_neighbour_counts_by_eq3(source, index, folders, extractor, tmp_path, monkeypatch):
    """Fixed predictions after each round: wrong -> +4 K0, right but uncertain -> +2 K0, else +0."""
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    train = list(index.train)
    n, k0 = len(train), 1
    labels = torch.tensor([s.label for s in train])
    kind = torch.arange(n) % 3  # 0 wrong, 1 right & uncertain, 2 right & confident
    probs = torch.zeros(n, 2)
    for i in range(n):
        y = int(labels[i])
        p = {0: 0.9, 1: 0.2, 2: 0.001}[int(kind[i])]  # probability of the *other* class
        probs[i, 1 - y], probs[i, y] = p, 1 - p
    monkeypatch.setattr(joint_mod, "_probs_cached", lambda *a, **k: probs.clone())
    order = torch.stack([torch.randperm(len(pool), generator=torch.Generator().manual_seed(i)) for i in range(n)])
    seen_k = []

    def neighbours(samples, k):
        seen_k.append(k)
        return joint_mod.KnnResult(torch.arange(k, dtype=torch.float32).expand(len(samples), k).clone(), order[:, :k])

    data = JointData(pool=pool, neighbours=neighbours, k0=k0, max_rounds=3, csv_path=tmp_path / "retrieval.csv",
                     target_classes=index.classes)
    cfg = TrainConfig(frozen_stages=-1, epochs=3, batch_size=8, patience=10)
    res = train_joint(source, train, index.val, 2, cfg, extractor=extractor, joint=data)
    # delta = 0.1 above the entropy of the label-smoothed target (0.1 smoothing, 2 classes: 0.199 nats),
    # so (0.8, 0.2) (0.500 nats) is uncertain and (0.999, 0.001) (0.008 nats) is not
    assert data.notes["delta"] == pytest.approx(0.1 + smoothing_entropy(0.1, 2), abs=1e-4)
    assert smoothing_entropy(0.1, 2) == pytest.approx(-(0.95 * np.log(0.95) + 0.05 * np.log(0.05)))
    assert smoothing_entropy(0.0, 2) == 0.0
    sched = HardSampleSchedule(k0, max_rounds=3)
    assert seen_k == [min(sched.max_count, len(pool))] == [9]
    step = torch.tensor([4 * k0, 2 * k0, 0])[kind]
    expected = [k0 + r * step for r in range(3)]  # after rounds 0, 1, 2
    rounds = data.notes["rounds"]
    assert [r["start_epoch"] for r in rounds] == [0, 1, 2]
    for r, want in zip(rounds, expected):
        assert r["mean_k"] == pytest.approx(float(want.float().mean()), abs=1e-3)
        assert r["max_k"] == int(want.max())
    assert rounds[0]["wrong"] == int((kind == 0).sum()) and rounds[0]["uncertain"] == int((kind == 1).sum())
    # retrieval.csv: every target lists exactly its final count of neighbours, in rank order,
    # with the round in which each joined
    with open(tmp_path / "retrieval.csv") as fh:
        rows = list(csv.DictReader(fh))
    per_target: dict[str, list[dict]] = {}
    for row in rows:
        per_target.setdefault(row["target_path"], []).append(row)
    for i, s in enumerate(train):
        got = per_target[str(s.path)]
        assert len(got) == int(expected[-1][i])
        assert [int(r["rank"]) for r in got] == list(range(1, len(got) + 1))
        assert [r["pool_path"] for r in got] == [str(pool.samples[int(j)].path) for j in order[i, :len(got)]]
        joined = [int(r["round"]) for r in got]
        assert joined == [int((torch.stack(expected)[:, i] <= rank).sum()) for rank in range(len(got))]
    # the exported net is the target net only
    assert res.net.head.out_features == 2 and data.notes["joint"] and data.notes["pool_images_used"] > 0


def test_round_lr_factor_restarts_each_round_at_full_rate():
    """Round 0: warm-up then cosine to 0; each later round starts at 1 (no warm-up) and decays."""
    f = [round_lr_factor(s, 30, 5, [0, 10, 20]) for s in range(30)]
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert f[10] == 1.0 and f[20] == 1.0  # the enlarged neighbour sets start at the full rate
    assert f[9] < 0.1 and f[19] < 0.1 and f[29] < 0.1
    assert all(a > b for a, b in zip(f[10:19], f[11:20])) and all(a > b for a, b in zip(f[20:29], f[21:30]))
    # one round is the plain warm-up cosine over all steps
    one = [round_lr_factor(s, 30, 5) for s in range(30)]
    assert one[10] < 1.0 and one[:5] == f[:5]
    assert one == [round_lr_factor(s, 30, 5, [0]) for s in range(30)]


class _RecordRounds(TrainingHooks):
    """Round callbacks and the net's weights at every epoch boundary (no extra rows)."""

    def __init__(self, round_starts):
        self.round_starts = tuple(round_starts)
        self.ended, self.at_start, self.at_end = [], [], []

    def _state(self):
        return {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def setup(self, run):
        self.net = run.net
        return None

    def start_epoch(self, epoch):
        self.at_start.append(self._state())

    def end_epoch(self, metrics):
        self.at_end.append(self._state())

    def end_round(self, round_idx):
        self.ended.append(round_idx)


def _worsening_val(monkeypatch):
    """Every epoch's decision score is worse than the one before: early stopping would keep epoch 0."""
    real, calls = train_mod._evaluate, []

    def evaluate(*a, **k):
        m = real(*a, **k)
        calls.append(1)
        return {**m, "accuracy": 1.0 - 0.1 * len(calls), "macro_f1": 1.0 - 0.1 * len(calls), "loss": 0.1 * len(calls)}

    monkeypatch.setattr(train_mod, "_evaluate", evaluate)


def test_rounds_are_iterations_of_fine_tuning(source, index, extractor, monkeypatch):
    """Each round continues from the previous one's weights with its own learning-rate schedule
    (full rate at every round start); no early stopping reaches back: the last round's net is returned."""
    lrs = []
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    _worsening_val(monkeypatch)
    train = list(index.train)  # 20 images, batch 8: 3 steps per epoch
    cfg = TrainConfig(frozen_stages=-1, epochs=6, batch_size=8, lr=0.01, warmup_epochs=1, patience=1)
    hooks = _RecordRounds([0, 2, 4])
    res = train_model(source, train, index.val, 2, cfg, extractor=extractor, hooks=hooks)
    assert len(lrs) == 18 and hooks.ended == [0, 1]
    assert lrs[6] == pytest.approx(0.01) and lrs[12] == pytest.approx(0.01)  # rounds 1 and 2 start at full rate
    assert lrs[5] < 0.003 and lrs[11] < 0.001 and lrs[0] < 0.01  # each round decays; round 0 warms up
    # patience 1 and a worsening decision score: the rounds still all run, and the last epoch is kept
    assert len(res.history) == 6 and res.best_epoch == 5
    for k, v in res.net.state_dict().items():
        torch.testing.assert_close(v, hooks.at_end[-1][k])
    for e in (2, 4):  # a round starts from the weights the previous round ended with
        for k, v in hooks.at_start[e].items():
            torch.testing.assert_close(v, hooks.at_end[e - 1][k])
    # one round (plain training): the same worsening score stops it and keeps epoch 0
    plain = train_model(source, train, index.val, 2, cfg, extractor=extractor, hooks=_RecordRounds([0]))
    assert len(plain.history) == 2 and plain.best_epoch == 0


def test_joint_rounds_keep_the_last_round_and_record_its_scores(source, index, folders, extractor, tmp_path,
                                                               monkeypatch):
    _worsening_val(monkeypatch)
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    data = JointData(pool=pool, neighbours=joint_mod.random_neighbours(len(pool), seed=1), k0=1, max_rounds=2)
    cfg = TrainConfig(frozen_stages=-1, epochs=4, batch_size=8, patience=1)
    res = train_joint(source, index.train, index.val, 2, cfg, extractor=extractor, joint=data)
    assert len(res.history) == 4 and res.best_epoch == 3 and data.notes["rounds_run"] == 2
    assert [len(r["val_score"]) for r in data.notes["rounds"]] == [2, 2]
    assert data.notes["rounds"][1]["val_score"][-1] == pytest.approx(res.history[-1].accuracy, abs=1e-4)


def test_source_head_init_is_a_searched_choice(source, index, folders, extractor, tmp_path):
    from autotl._recipe import load_recipe

    assert "source_head_init" in SelectiveJointFineTuning.params
    dim = load_recipe("retrieval").dimension("source_head_init")  # the shipped retrieval recipe searches it
    assert dim is not None and set(dim.choices) == {"imagenet", "random"}
    opts = {"source_pool": str(folders[1]), "retrieval_cache_dir": str(tmp_path / "rc")}
    got = {}
    for init in ("imagenet", "random"):
        ctx = StrategyContext(index, source, extractor, tmp_path, TrainConfig(frozen_stages=-1, epochs=1, batch_size=8),
                              list(index.train), options=dict(opts))
        SelectiveJointFineTuning().apply(ctx, {"retrieval_k": 1, "source_head_init": init})
        train_strategy(ctx, index.val)
        got[init] = ctx.notes["retrieval"]["source_head_init"]
    assert got["imagenet"].startswith("imagenet rows (2/3") and got["random"] == "random"
    assert "source head random" in SelectiveJointFineTuning().describe({"retrieval_k": 1, "source_head_init": "random"})


def test_pool_copies_of_data_images_are_left_out_by_content(source, index, folders, extractor, tmp_path):
    """A pool holding copies of the data set's images (renamed, in other folders) is not disjoint
    from it: those images would train beside the validation images they are. Compared by content
    (sha256), they are left out of the pool, in every trial and the final fit, and the card says so."""
    import shutil
    from types import SimpleNamespace

    from autotl.fit import source_pool_overlap
    from autotl.retrieval.pool import without_data_copies

    root = tmp_path / "pool"
    shutil.copytree(folders[1], root)
    val_img, train_img = index.val[0].path, index.train[0].path
    shutil.copyfile(val_img, root / "other" / "renamed.png")
    (root / "n99999999").mkdir()
    shutil.copyfile(train_img, root / "n99999999" / "only_a_copy.png")  # a class of copies only
    pool = scan_pool(root)
    clean, copies = without_data_copies(pool, [*index.train, *index.val, *index.test])
    assert {(c["pool"], c["data"]) for c in copies} == {(str(root / "other" / "renamed.png"), str(val_img)),
                                                       (str(root / "n99999999" / "only_a_copy.png"), str(train_img))}
    assert len(clean) == len(pool) - 2 and clean.classes == [c for c in pool.classes if c != "n99999999"]
    assert all(0 <= s.label < clean.num_classes for s in clean.samples) and clean.fingerprint != pool.fingerprint
    assert not {str(s.path) for s in clean.samples} & {c["pool"] for c in copies}

    ctx = StrategyContext(index, source, extractor, tmp_path, TrainConfig(frozen_stages=-1, epochs=1, batch_size=8),
                          list(index.train), options={"source_pool": str(root), "retrieval_cache_dir": str(tmp_path / "rc")})
    SelectiveJointFineTuning().apply(ctx, {"retrieval_k": 2})
    notes = ctx.notes["retrieval"]
    assert notes["pool_images"] == len(pool) - 2 and notes["pool_data_copies_excluded"] == 2
    card = source_pool_overlap(SimpleNamespace(index=index, cache_dir=None, memory=None), {"source_pool": str(root)})
    assert card["data_copies_excluded"] == 2 and card["compared_by"] == "sha256" and len(card["data_copies"]) == 2

    same = tmp_path / "same"
    (same / "n01440764").mkdir(parents=True)
    shutil.copyfile(val_img, same / "n01440764" / "a.png")
    with pytest.raises(AutotlError, match="every one of its 1 images is a copy"):
        without_data_copies(scan_pool(same), [*index.train, *index.val])


# ------------------------------------------------------------------ the strategy


def test_retrieval_k_without_pool_is_a_clear_error(source, index, extractor, tmp_path):
    assert STRATEGIES["retrieval"] == "autotl.retrieval.strategy:SelectiveJointFineTuning"
    assert "dropout" in STRATEGIES
    ctx = StrategyContext(index, source, extractor, tmp_path, TrainConfig(), list(index.train))
    with pytest.raises(AutotlError, match="give --source-pool DIR"):
        apply_strategies(ctx, {"retrieval_k": 2})
    strategy = SelectiveJointFineTuning()
    assert not strategy.is_active({"retrieval_k": 0}) and not strategy.is_active({})
    with pytest.raises(AutotlError, match="retrieval_bank"):
        strategy.apply(ctx.__class__(index, source, ctx.extractor, tmp_path, TrainConfig(), list(index.train),
                                     options={"source_pool": str(tmp_path)}), {"retrieval_k": 1, "retrieval_bank": "sobel"})


def test_second_apply_reuses_descriptors(source, index, folders, extractor, tmp_path):
    from autotl._memory import BoundedMemory

    opts = {"source_pool": str(folders[1]), "retrieval_cache_dir": str(tmp_path / "rc")}

    def apply(memory):
        ctx = StrategyContext(index, source, extractor, tmp_path, TrainConfig(frozen_stages=-1),
                              list(index.train), options=dict(opts), memory=memory)
        SelectiveJointFineTuning().apply(ctx, {"retrieval_k": 2, "retrieval_bank": "gabor"})
        assert [type(h) for h in ctx.hooks] == [JointFineTuningHooks]
        return ctx.notes["retrieval"]

    run_memory = BoundedMemory()
    first = apply(run_memory)
    described = retrieval_stats(run_memory)["described_images"]
    assert described == len(index.train) + sum(POOL_CLASSES.values()) and not first["memory_hit"]
    second = apply(run_memory)  # the next trial of the same run: in its memory
    assert second["memory_hit"] and retrieval_stats(run_memory)["memory_hits"] == 1
    next_run = BoundedMemory()  # another run (or process): from the disk cache
    third = apply(next_run)
    assert not third["memory_hit"] and third["pool_cache_hit"]
    assert retrieval_stats(run_memory)["described_images"] == described
    assert retrieval_stats(next_run)["described_images"] == 0  # nothing recomputed
    assert retrieval_stats(run_memory)["edge_fits"] == 1 and retrieval_stats(next_run)["edge_fits"] == 0


def _eq1(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """Eq. (1) with one bank (w_h = 1/48 for every filter), in float64, all pairs."""
    p, q = P.double()[:, None], Q.double()[None]
    return (((p - q) * (p.log() - q.log())).sum(-1) / P.shape[1]).sum(-1)


def test_fit_with_retrieval_end_to_end(source, index, folders, tmp_path):
    import onnxruntime as ort

    from autotl.fit import fit

    data, pool_root = folders
    out = tmp_path / "run"
    res = fit(data, out, models=[MODEL], frozen_stages=-1, epochs=1, batch_size=8,
              fixed_params={"retrieval_k": 2}, options={"source_pool": str(pool_root)}, search=False)
    assert res.classes == ["cat", "dog"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: np.zeros((1, 3, 64, 64), np.float32)})[0]
    assert y.shape == (1, 2)  # the target classes only: the source head is not exported
    notes = res.training["strategies"]["retrieval"]
    assert notes["joint"] and notes["k0"] == 2 and notes["pool_images"] == sum(POOL_CLASSES.values())
    assert notes["pool_skipped"] == 1 and (out / "retrieval.jpg").is_file()

    # retrieval.csv: the first K0 neighbours of every target are its exact K-NN under eq. (1)
    with open(out / "retrieval.csv") as fh:
        rows = list(csv.DictReader(fh))
    pool = scan_pool(pool_root)
    train_paths = [str(s.path) for s in index.train]
    bank = gabor_filter_bank()
    edges = fit_bin_edges(bank, sorted(train_paths), 32, image_size=128, seed=0)
    D = _eq1(histograms(bank, load_images(train_paths, 128), edges), histograms(bank, load_images(pool.paths, 128), edges))
    ref = D.argsort(dim=1, stable=True)[:, :2]
    for i, p in enumerate(train_paths):
        got = sorted((int(r["rank"]), r["pool_path"], float(r["distance"])) for r in rows if r["target_path"] == p)
        assert [g[1] for g in got[:2]] == [pool.paths[int(j)] for j in ref[i]]
        assert [g[2] for g in got[:2]] == pytest.approx(D[i, ref[i]].tolist(), rel=1e-4, abs=1e-6)


def test_all_frozen_falls_back_to_plain_training(source, index, folders, extractor, tmp_path):
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    calls = []
    data = JointData(pool=pool, neighbours=lambda s, k: calls.append(k), k0=1)
    cfg = TrainConfig(frozen_stages="all", epochs=1)
    res = train_joint(source, index.train, index.val, 2, cfg, extractor=extractor, joint=data)
    assert not data.notes["joint"] and not calls and res.net.frozen == res.net.num_stages


def test_joint_training_composes_with_l2sp_and_random_pool(source, index, folders, extractor, tmp_path):
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    """Also the uncached path: decoded images with training augmentation, the frozen prefix per step."""
    pool = scan_pool(folders[1], cache_dir=tmp_path)
    data = JointData(pool=pool, neighbours=joint_mod.random_neighbours(len(pool), seed=3), k0=1, source_weight=0.5,
                     max_rounds=2, class_weights=np.array([1.0, 2.0, 0.5], np.float32), source_head_init="random")
    cfg = TrainConfig(frozen_stages=-1, epochs=2, batch_size=8, regularizer="l2sp", reg_lambda=0.01, use_cache=False)
    res = train_joint(source, index.train, index.val, 2, cfg, extractor=extractor, joint=data)
    assert len(res.history) == 2 and all(np.isfinite(h.train_loss) for h in res.history)
    assert data.notes["source_head_init"] == "random" and not data.notes["cached_prefix"]
    assert data.notes["rounds_run"] == 2 and data.notes["rounds"][1]["mean_k"] >= 1
