"""Honest selection: folds that never let an image both decide and score, the one-SE rule,
the objective's wiring of each fold's parts, search as the default and --no-search."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import autotl.train
from autotl.data import scan_dataset
from autotl.errors import AutotlError
from autotl.run import Run
from autotl.search import SearchOptions, parse_recipe, plan_search, plan_selection, select_one_se, stratified_folds
from autotl.search._folds import CV_MAX_IMAGES
from autotl.train import TrainConfig

MODEL = "test_efficientnet=random"

pytestmark = pytest.mark.usefixtures("single_thread")


def _paths(samples) -> set:
    return {s.path for s in samples}


def _assert_honest(selection, labelled) -> None:
    """Each fold: train, decide and score pairwise disjoint; nothing outside the labelled images."""
    for i, fold in enumerate(selection.folds):
        tr, de, sc = _paths(fold.train), _paths(fold.decide), _paths(fold.score)
        assert not sc & tr, f"fold {i}: scoring images in training"
        assert not sc & de, f"fold {i}: scoring images decide early stopping / the dropout reference"
        assert not tr & de, f"fold {i}: decision images are trained on"
        assert (tr | de | sc) <= _paths(labelled) and sc and de and tr


@pytest.fixture
def pooled(tmp_path, make_image_folder):
    """No val/ folder: a 10 % val split is made, and cross-validation pools all labelled images."""
    return scan_dataset(make_image_folder(tmp_path / "pooled", {"a": 12, "b": 9, "c": 7}, size=(16, 16)))


@pytest.fixture
def folders(tmp_path, make_image_folder):
    return scan_dataset(make_image_folder(tmp_path / "folders", {"a": [10, 6], "b": [10, 5]}, splits=["train", "val"],
                                          size=(16, 16)))


def test_cv_folds_never_score_what_decided(pooled):
    sel = plan_selection(pooled, seed=3, k=5)
    labelled = pooled.train + pooled.val
    assert sel.kind == "cv" and sel.repeats == 2 and len(sel.folds) == 2 * sel.k  # tiny: two partitions
    _assert_honest(sel, labelled)
    # within one partition every labelled image scores exactly once
    for r in range(sel.repeats):
        part = sel.folds[r * sel.k:(r + 1) * sel.k]
        scored = [s.path for f in part for s in f.score]
        assert sorted(scored) == sorted(s.path for s in labelled)
    # every fold's decision part holds every class (early stopping and dropout see each class)
    assert all({s.label for s in f.decide} == {0, 1, 2} for f in sel.folds)
    # deterministic in the seed, different for another seed
    assert plan_selection(pooled, seed=3).folds == sel.folds
    assert plan_selection(pooled, seed=4).folds != sel.folds


def test_val_folder_is_trusted_and_cross_fitted(folders):
    sel = plan_selection(folders, seed=0, k=5)
    assert sel.kind == "val-cv" and sel.k == 5  # the smallest val class has 5 images
    _assert_honest(sel, folders.train + folders.val)
    for fold in sel.folds:
        assert list(fold.train) == folders.train  # train/ only trains
        assert _paths(fold.decide) | _paths(fold.score) == _paths(folders.val)  # val/ decides and scores, cross-fitted


def test_holdout_for_large_data(pooled, folders):
    for index, kind in ((pooled, "holdout"), (folders, "holdout")):
        sel = plan_selection(index, max_cv=10)
        assert sel.kind == kind and len(sel.folds) == 1
        _assert_honest(sel, index.train + index.val)
    assert CV_MAX_IMAGES == 2000


def test_stratified_folds_balance_small_classes():
    import numpy as np

    samples = [SimpleNamespace(path=Path(f"{c}{i}"), label=c) for c in range(7) for i in range(3)]
    folds = stratified_folds(samples, 5, np.random.default_rng(0))
    sizes = sorted(len(f) for f in folds)
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 21


# ----------------------------------------------------------------------------------------- one-SE rule
def _trial(number, value, se, *, frozen, dropout=None, seconds=1.0):
    params = {"frozen_stages": "all" if frozen == 9 else -1, "dropout_tau": dropout, "model": "m"}
    return SimpleNamespace(number=number, value=value, state=SimpleNamespace(name="COMPLETE"), params=params,
                           user_attrs={"value_se": se, "frozen": frozen, "num_stages": 9, "seconds": seconds})


def test_one_se_rule_prefers_the_simpler_within_noise():
    probe = _trial(0, 0.80, 0.03, frozen=9)
    finetune = _trial(1, 0.82, 0.03, frozen=8)  # better by less than one SE
    with_dropout = _trial(2, 0.81, 0.03, frozen=9, dropout=1.0)
    winner, how = select_one_se([finetune, with_dropout, probe], lambda t: t.params)
    assert winner is probe and how["best_mean_trial"] == 1 and how["within_one_se"] == [0, 1, 2]


def test_one_se_rule_keeps_a_clear_win():
    probe = _trial(0, 0.80, 0.01, frozen=9)
    dropout = _trial(1, 0.90, 0.01, frozen=9, dropout=1.0)  # noisy labels: dropout wins by 10 SE
    winner, how = select_one_se([probe, dropout], lambda t: t.params)
    assert winner is dropout and how["within_one_se"] == [1]
    assert select_one_se([], lambda t: t.params) == (None, {})


# ----------------------------------------------------------------------------------------- objective wiring
def test_objective_trains_decides_and_scores_on_each_fold_part(tmp_path, make_image_folder, monkeypatch):
    """A trained trial: train_model gets the fold's training part and early-stops on its decision part;
    the dropout reference is the decision part; the score comes from the scoring part, which decided
    nothing. (Solved probes: tests/test_probe.py.)"""
    import autotl.search._objective as objective_mod
    from autotl.strategy import StrategyContext

    data = make_image_folder(tmp_path / "d", {"cat": 10, "dog": 10}, size=(32, 32))
    run = Run.open(data, tmp_path / "run", models=[MODEL], device="cpu", cache_dir=tmp_path / "cache")
    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "space": {"frozen_stages": [-1], "epochs": 1,
                                                                            "dropout_tau": [0.0]}}, "t")
    plan = plan_search(run, TrainConfig(epochs=1, batch_size=8, objective="accuracy"),
                       SearchOptions(trials=1, recipe=recipe, cv_folds=3, cv_repeats=1))
    calls, scored, references = [], [], []
    real_train, real_eval = autotl.train.train_model, objective_mod.score_fold
    real_init = StrategyContext.__post_init__

    def train(source, train_samples, val_samples, *a, **k):
        calls.append((list(train_samples), list(val_samples)))
        return real_train(source, train_samples, val_samples, *a, **k)

    def score_fold(net, extractor, samples, *a, **k):
        scored.append(list(samples))
        return real_eval(net, extractor, samples, *a, **k)

    def init(self):
        real_init(self)
        references.append(list(self.reference))

    monkeypatch.setattr(autotl.train, "train_model", train)
    monkeypatch.setattr(objective_mod, "score_fold", score_fold)
    monkeypatch.setattr(StrategyContext, "__post_init__", init)
    trial = plan.run_trials().study.get_trials()[0]
    folds = plan.selection.folds
    assert len(calls) == len(scored) == len(references) == len(folds) == 3
    for (tr, val), score, ref, fold in zip(calls, scored, references, folds):
        assert _paths(val) == _paths(fold.decide) and _paths(ref) == _paths(fold.decide)
        assert _paths(tr) <= _paths(fold.train)  # dropout may have dropped some
        assert score == list(fold.score)
        assert not _paths(score) & (_paths(tr) | _paths(val) | _paths(ref))
    assert trial.user_attrs["n_folds"] == 3 and len(trial.user_attrs["fold_scores"]) == 3
    assert trial.value == pytest.approx(sum(trial.user_attrs["fold_scores"]) / 3)


# ----------------------------------------------------------------------------------------- search is the default
@pytest.mark.slow
def test_time_budget_alone_starts_a_search_and_no_search_does_not(tmp_path, make_image_folder, capsys):
    from autotl.cli import main

    data = make_image_folder(tmp_path / "d", {"cat": 6, "dog": 6}, size=(32, 32))
    common = ["--model", MODEL, "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--json", "--epochs", "2"]
    assert main(["fit", str(data), "--out", str(tmp_path / "s"), "--time-budget", "5s", "--cv-folds", "2", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["search"] is not None and doc["search"]["time_budget_s"] == 5 and doc["search"]["n_trials"] >= 1
    assert (tmp_path / "s" / "study.db").is_file()
    assert doc["search"]["refit_on"].startswith("all labelled")

    assert main(["fit", str(data), "--out", str(tmp_path / "p"), "--no-search", *common]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["search"] is None and not (tmp_path / "p" / "study.db").exists()
    assert doc["training"]["frozen_stages"] == doc["training"]["num_stages"]  # the plain linear probe

    assert main(["fit", str(data), "--out", str(tmp_path / "x"), "--no-search", "--trials", "3", *common]) == 2
    assert "--no-search with --trials" in capsys.readouterr().err


def test_default_search_budget_is_automatic_and_printed(tmp_path, make_image_folder, monkeypatch):
    """Plain fit (no flags) searches under the automatic budget, which is printed before it starts."""
    import autotl.search
    from autotl.fit import fit

    data = make_image_folder(tmp_path / "d", {"cat": 5, "dog": 5}, size=(16, 16))
    seen = {}

    def fake_search(run, base, opts):
        seen.update(vars(opts))
        raise AutotlError("stop here")

    monkeypatch.setattr(autotl.search, "search", fake_search)
    with pytest.raises(AutotlError, match="stop here"):
        fit(data, tmp_path / "run", models=[MODEL], cache_dir=tmp_path / "cache")
    assert seen["time_budget"] == pytest.approx(60 + 0.18 * 10) and seen["trials"] is None
    with pytest.raises(AutotlError, match="stop here"):
        fit(data, tmp_path / "run2", models=[MODEL], cache_dir=tmp_path / "cache", trials=3)
    assert seen["time_budget"] is None and seen["trials"] == 3  # --trials alone: no time limit


def test_standard_error_is_not_zero_for_a_perfect_score_on_few_images(pooled):
    """A trial scoring 1.0 on every fold of 28 images is not certain: its SE has a binomial floor,
    so a simpler trial one image behind is within one SE and is selected (two behind is not)."""
    sel = plan_selection(pooled, k=5)
    se = sel.standard_error([1.0] * len(sel.folds))
    n = sel.n_scored
    assert n == len(pooled.train) + len(pooled.val)
    assert se == pytest.approx(((n + 2) / (n + 4) * (2 / (n + 4)) / (n + 4)) ** 0.5)  # Agresti–Coull
    assert sel.standard_error([0.5, 1.0, 0.5, 1.0, 0.5] * sel.repeats) > se  # spread dominates when large
    perfect = _trial(1, 1.0, se, frozen=8, dropout=2.0)
    probe = _trial(0, 1.0 - 1 / n, se, frozen=9)
    winner, _ = select_one_se([perfect, probe], lambda t: t.params)
    assert winner is probe
    worse = _trial(0, 1.0 - 2 / n, se, frozen=9)
    assert select_one_se([perfect, worse], lambda t: t.params)[0] is perfect


def test_identical_copies_stay_in_one_fold(tmp_path, make_image_folder):
    """Byte-identical files (listed by the scan) never score a fold their twin trained or decided on."""
    import shutil as _shutil

    root = make_image_folder(tmp_path / "dups", {"a": 12, "b": 12}, size=(16, 16))
    for i in range(4):  # four byte-identical copies inside class a
        _shutil.copyfile(root / "a" / "a_000.png", root / "a" / f"copy{i}.png")
    index = scan_dataset(root, duplicates="warn")
    groups = [set(g) for g in index.duplicate_groups()]
    assert groups and max(len(g) for g in groups) >= 2
    for fold in plan_selection(index, seed=1).folds:
        for g in groups:
            sides = [bool(g & _paths(part)) for part in (fold.score, fold.train + fold.decide)]
            assert not all(sides), "copies on both sides of a fold"


def _copy_near(src: Path, dst: Path) -> None:
    """A near-duplicate of ``src`` at ``dst``: the same picture 3 grey levels brighter (not byte-identical)."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(src).convert("RGB")).astype(int)
    Image.fromarray(np.clip(a + 3, 0, 255).astype(np.uint8)).save(dst)


def _with_copies(root: Path, pairs) -> None:
    import shutil as _shutil

    for kind, src, dst in pairs:
        (root / dst).parent.mkdir(parents=True, exist_ok=True)
        if kind == "exact":
            _shutil.copyfile(root / src, root / dst)
        else:
            _copy_near(root / src, root / dst)


def _assert_copies_on_one_side(selection, groups) -> None:
    """In every fold, each group of copies lies in one part at most (train, decide or score)."""
    for i, fold in enumerate(selection.folds):
        parts = {"train": _paths(fold.train), "decide": _paths(fold.decide), "score": _paths(fold.score)}
        for g in groups:
            sides = [name for name, paths in parts.items() if paths & set(g)]
            assert len(sides) <= 1, f"fold {i}: copies {sorted(p.name for p in g)} in {sides}"


@pytest.fixture
def pooled_copies(tmp_path, make_image_folder):
    """No val/ folder; eight images each with a byte-identical and a near-duplicate copy in its class."""
    root = make_image_folder(tmp_path / "pc", {"a": 14, "b": 14}, size=(24, 24))
    _with_copies(root, [(kind, f"{c}/{c}_{i:03d}.png", f"{c}/{kind}{i}.png")
                        for c in "ab" for i in range(4) for kind in ("exact", "near")])
    index = scan_dataset(root)
    groups = index.duplicate_groups(near=True)
    assert sorted(len(g) for g in groups) == [3] * 8
    return index, groups


@pytest.fixture
def folder_copies(tmp_path, make_image_folder):
    """train/ and val/ folders; train/ holds byte-identical and near copies of val/ images, and each
    split holds copies of its own images."""
    root = make_image_folder(tmp_path / "fc", {"a": [12, 6], "b": [12, 6]}, splits=["train", "val"], size=(24, 24))
    pairs = [(kind, f"val/{c}/{c}_{i:03d}.png", f"train/{c}/{kind}_of_val{i}.png")
             for c in "ab" for i, kind in ((0, "exact"), (1, "near"), (2, "exact"), (3, "near"))]
    pairs += [("near", "val/a/a_004.png", "val/a/near_in_val.png"), ("exact", "train/b/b_000.png", "train/b/again.png")]
    _with_copies(root, pairs)
    index = scan_dataset(root)
    groups = index.duplicate_groups(near=True)
    assert len(groups) == 10
    return index, groups


@pytest.mark.parametrize("seed", range(3))
def test_cv_keeps_copies_and_near_duplicates_on_one_side(pooled_copies, seed):
    """cv: a copy never scores or decides a fold its twin trains on, nor is it split between the fit
    and decision parts; nothing is left out."""
    index, groups = pooled_copies
    sel = plan_selection(index, seed=seed, k=4)
    assert sel.kind == "cv"
    _assert_honest(sel, index.train + index.val)
    _assert_copies_on_one_side(sel, groups)
    for fold in sel.folds:
        assert _paths(fold.train) | _paths(fold.decide) | _paths(fold.score) == _paths(index.train + index.val)


@pytest.mark.parametrize("seed", range(3))
def test_val_cv_trains_no_fold_on_a_copy_of_a_val_image(folder_copies, seed):
    """val-cv: every val image scores or decides in every fold, so its train/ twin trains none; the
    val/ images themselves all still decide and score, and copies inside val stay in one part."""
    index, groups = folder_copies
    sel = plan_selection(index, seed=seed, k=3)
    assert sel.kind == "val-cv"
    _assert_honest(sel, index.train + index.val)
    _assert_copies_on_one_side(sel, groups)
    val = _paths(index.val)
    twins = {p for g in groups if set(g) & val for p in g} - val
    assert len(twins) == 8
    for fold in sel.folds:
        assert _paths(fold.train) == _paths(index.train) - twins  # only the twins of val images are left out
        assert _paths(fold.decide) | _paths(fold.score) == val


@pytest.mark.parametrize("seed", range(3))
def test_holdout_keeps_copies_together(pooled_copies, folder_copies, seed):
    """holdout (many images), pooled or with a val/ folder: copies on one side of the fit / decide /
    score split; a train/ twin of a val/ image does not train."""
    for index, groups in (pooled_copies, folder_copies):
        sel = plan_selection(index, seed=seed, max_cv=10)
        assert sel.kind == "holdout"
        _assert_honest(sel, index.train + index.val)
        _assert_copies_on_one_side(sel, groups)
    index, groups = folder_copies
    fold = plan_selection(index, seed=seed, max_cv=10).folds[0]
    assert not {p for g in groups if set(g) & _paths(index.val) for p in g} & _paths(fold.train)


def test_a_source_pool_adds_retrieval_k_to_a_recipe_without_it():
    from autotl.search import load_recipe, with_pool_dimension

    recipe = load_recipe("default")
    assert recipe.dimension("retrieval_k") is None
    widened = with_pool_dimension(recipe)
    dim = widened.dimension("retrieval_k")
    assert dim is not None and 0 in dim.choices  # the search can leave retrieval off
    assert not dim.active({"frozen_stages": "all"}) and dim.active({"frozen_stages": -1})  # joint fine-tuning needs a trainable backbone
    assert widened.fingerprint() != recipe.fingerprint()
    assert with_pool_dimension(load_recipe("retrieval")).dimension("retrieval_k") == load_recipe("retrieval").dimension("retrieval_k")


def test_one_se_rule_does_not_equate_a_trial_far_worse_in_log_loss():
    """Equal accuracy on 40 images, but the simpler trial's probabilities are far worse on the same
    images: it is not an equal. A simpler trial whose log loss is only noisily worse still wins."""
    import numpy as np

    from autotl.ensemble import encode_probs

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 20)

    def probs(p_true):
        p = np.empty((40, 2))
        p[np.arange(40), labels] = p_true
        p[np.arange(40), 1 - labels] = 1 - p_true
        return p

    sharp = _trial(1, 0.975, 0.03, frozen=8)
    sharp.user_attrs["oof"] = encode_probs(probs(np.full(40, 0.97)))
    vague = _trial(0, 0.975, 0.03, frozen=9)  # simpler, same accuracy, probabilities near 0.6
    vague.user_attrs["oof"] = encode_probs(probs(np.full(40, 0.6) + rng.normal(0, 0.02, 40)))
    winner, how = select_one_se([sharp, vague], lambda t: t.params, oof_labels=labels)
    assert winner is sharp and how["worse_in_log_loss"] == [0]
    # without out-of-fold probabilities the plain rule applies: the simpler one
    assert select_one_se([sharp, vague], lambda t: t.params)[0] is vague
    close = _trial(2, 0.975, 0.03, frozen=9)
    close.user_attrs["oof"] = encode_probs(probs(np.clip(0.97 + rng.normal(0, 0.05, 40), 0.5, 0.999)))
    assert select_one_se([sharp, close], lambda t: t.params, oof_labels=labels)[0] is close
