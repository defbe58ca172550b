"""Solved linear probes: the batched solver, the feature layout (backbones, taps, flip views), the
exported graph, the probe trial's folds, the shared run input, and LP-FT / WiSE-FT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autotl.data import scan_dataset
from autotl.dropout.influence import fit_logistic_head
from autotl.features import FeatureExtractor
from autotl.models import create_source_model, shared_input_config
from autotl.probe import (FeatureSpec, ProbeModel, ReducedFeatures, feature_blocks, feature_matrix, parse_backbones)
from autotl.run import Run
from autotl.train import TrainConfig

pytestmark = pytest.mark.usefixtures("single_thread")

MODELS = ["test_efficientnet=random", "resnet10t=random"]


def _problem(n=36, d=300, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.2, 3.0, d)  # features on different scales
    x[:, :k] += 2.0 * torch.nn.functional.one_hot(y, k).float()
    return x, y


# ----------------------------------------------------------------------------------- the solver
@pytest.mark.parametrize("n,d", [(36, 300), (120, 40)])  # fewer rows than features (reduced) and more
def test_solver_reaches_the_float64_newton_optimum(n, d):
    x, y = _problem(n, d)
    reduced = ReducedFeatures(x)
    problems = [list(range(0, n - 6)), list(range(6, n))]
    sol = reduced.solve(problems, y, 3, [0.1, 0.01], tol=1e-8)
    xs = ((x - reduced.mean) / reduced.scale).double().numpy()
    weight, bias = reduced.head(sol.theta[1])
    logits = reduced.logits(sol.theta[1])
    for b, rows in enumerate(problems):
        r = np.array(rows)
        ref = fit_logistic_head(xs[r], y[r].numpy(), 3, l2=0.01, bias_l2=1e-6, tol=1e-10)
        want = torch.softmax(torch.tensor(xs @ ref.W.T + ref.b), 1)
        got = torch.softmax((x @ weight[b] + bias[b]).double(), 1)
        assert torch.allclose(got, want, atol=2e-4), float((got - want).abs().max())
        # the reduced-space logits are the raw-feature head's logits
        assert torch.allclose(logits[:, b], x @ weight[b] + bias[b], atol=1e-3)


def test_the_path_predictor_starts_newton_near_each_next_solution(monkeypatch):
    """Extrapolated in log(lambda) through the last two solutions, each penalty after the second needs
    fewer Newton steps than from the last solution alone, and reaches the same optimum."""
    import autotl.probe as probe_mod

    x, y = _problem(120, 400)
    reduced = ReducedFeatures(x)
    problems = [list(range(0, 100)), list(range(20, 120))]
    lambdas = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003, 0.001)
    predicted = reduced.solve(problems, y, 3, lambdas, tol=1e-8)
    monkeypatch.setattr(probe_mod, "_path_start", lambda f, lams, solved: solved[-1])
    plain = reduced.solve(problems, y, 3, lambdas, tol=1e-8)
    assert predicted.newton_iterations[:2] == plain.newton_iterations[:2]
    assert sum(predicted.newton_iterations[2:]) < sum(plain.newton_iterations[2:])
    for a, b in zip(predicted.theta, plain.theta):
        assert torch.allclose(torch.softmax(reduced.logits(a), -1), torch.softmax(reduced.logits(b), -1), atol=1e-5)


def test_map_back_to_raw_features_is_computed_from_the_reread_rows():
    """A reduction that rereads its rows for ``head`` holds no ``(d, r)`` map and gives the same head as
    one that keeps it; rows reread in another order would give another head (what a cache that returned
    the wrong rows would do), and rows of another shape are refused."""
    x, y = _problem(40, 300)
    kept = ReducedFeatures(x)
    lazy = ReducedFeatures(x, reread=lambda: x.clone())
    assert lazy.nbytes < kept.nbytes and torch.equal(lazy.z, kept.z)
    theta = kept.solve([range(30), range(10, 40)], y, 3, [0.1]).theta[0]
    want_w, want_b = kept.head(theta)
    got_w, got_b = lazy.head(theta)
    assert torch.allclose(got_w, want_w, atol=1e-6) and torch.allclose(got_b, want_b, atol=1e-6)
    # the raw-feature head reproduces the reduced logits
    assert torch.allclose(torch.einsum("nd,bdk->nbk", x, got_w) + got_b, kept.logits(theta), atol=1e-3)
    shuffled = ReducedFeatures(x, reread=lambda: x.flip(0))
    assert not torch.allclose(shuffled.head(theta)[0], want_w, atol=1e-3)
    with pytest.raises(ValueError, match="reread"):
        ReducedFeatures(x, reread=lambda: x[:-1]).head(theta)


def test_problems_train_only_on_their_rows_and_lambda_path_is_monotone():
    x, y = _problem(30, 200)
    reduced = ReducedFeatures(x)
    sol = reduced.solve([range(20), range(25)], y, 3, [1.0, 0.1, 0.01])
    alone = reduced.solve([range(20)], y, 3, [1.0, 0.1, 0.01])
    assert torch.allclose(sol.theta[:, :, 0], alone.theta[:, :, 0], atol=1e-4)  # rows 20-24 train problem 1 only
    assert not torch.allclose(sol.theta[:, :, 1], alone.theta[:, :, 0], atol=1e-3)
    norms = [float(sol.theta[i, :-1, 1].norm()) for i in range(3)]
    assert norms[0] < norms[1] < norms[2]  # a weaker penalty, a larger head
    assert (sol.grad_norm < 1e-3).all()


# ----------------------------------------------------------------------------------- layout and graph
@pytest.fixture
def run(tmp_path, make_image_folder):
    data = make_image_folder(tmp_path / "data", {"a": 8, "b": 8, "c": 8}, size=(40, 32))
    return Run.open(data, tmp_path / "run", models=MODELS, device="cpu", cache_dir=tmp_path / "cache")


def _scored(run):
    """The run after fit's scoring pass: every candidate's center view of the training images computed."""
    for extractor in run.extractors.values():
        extractor.extract(list(run.index.train), description="train features")
    return run


def test_backbones_are_rank_positions():
    assert parse_backbones("1+3", ["a", "b", "c"]) == ("a", "c")
    assert parse_backbones("3", ["a"]) == ("a",)  # a recipe for three models on a run with one
    with pytest.raises(Exception, match="rank positions"):
        parse_backbones("0+1", ["a", "b"])


def test_run_shares_one_input_and_adapters_run_in_the_graph(run):
    """Every candidate reads the run's one preprocessed input; a model with other preprocessing gets it
    through its adapter, in the frozen pass (and so in every graph built from its stages)."""
    from autotl.features import ImageDataset, eval_transform
    from autotl.stages import InputAdapter

    configs = [s.native_config or s.data_config for s in run.sources.values()]
    shared = shared_input_config(configs)
    assert all(s.data_config == shared for s in run.sources.values())
    adapted = [s for s in run.sources.values() if s.native_config is not None]
    assert adapted, "the two test models have different preprocessing: one must be adapted"
    s = adapted[0]
    ex = run.extractors[s.label]
    assert isinstance(ex.stages[0][1][0], InputAdapter)
    samples = list(run.index.train)[:3]
    ds = ImageDataset(samples, eval_transform(shared))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    own = InputAdapter(shared, s.native_config)(images)
    with torch.no_grad():
        want = s.model.forward_head(s.model.forward_features(own), pre_logits=True)
    assert torch.allclose(ex.extract(samples).pooled, want, atol=1e-3)


def test_taps_and_flip_view_are_what_the_network_computes(run):
    from autotl.backend import global_pool

    label = run.labels[0]
    ex = run.extractors[label]
    samples = list(run.index.train)[:4]
    center = ex.extract(samples, view="center")
    flipped = ex.extract(samples, view="flip")
    from autotl.features import ImageDataset

    ds = ImageDataset(samples, ex.transform)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        for view, acts in (("center", center), ("flip", flipped)):
            a = images if view == "center" else images.flip(-1)
            taps = {}
            for i, (_, stage) in enumerate(ex.stages):
                if i in ex.tap_cuts:
                    taps[i] = global_pool(a)
                a = stage(a)
            pooled = ex.pool(a)
            assert torch.allclose(acts.pooled, pooled, atol=1e-3)
            for c in ex.tap_cuts:
                assert torch.allclose(acts.taps[c], taps[c], atol=1e-3)
    assert not torch.allclose(center.pooled, flipped.pooled, atol=1e-3)


def _probe_model(run, spec: FeatureSpec, heads: int = 2) -> ProbeModel:
    samples = list(run.index.train)
    d = feature_matrix(spec, run.extractors, samples).shape[1]
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(heads, d, 3, generator=g) * 0.05
    bias = torch.randn(heads, 3, generator=g) * 0.1
    return ProbeModel(spec, weight, bias, 0.01, len(samples))


def test_exported_probe_graph_computes_every_block_view_and_head(run, tmp_path):
    """ONNX = PyTorch ≤ 1e-4, and both = the probe read through the caches: a tap, a concatenated
    backbone, the flip view (TTA) or a bagged head dropped from the graph would break the equality."""
    from autotl.export import export_onnx, verify_onnx
    from autotl.features import ImageDataset

    spec = FeatureSpec(tuple(run.labels), taps=2, flip=True)
    assert [lab for lab, _ in feature_blocks(spec, run.extractors)].count(run.labels[1]) == 3  # pooled + 2 taps
    model = _probe_model(run, spec)
    net = model.net(run.extractors)
    samples = list(run.index.val) + list(run.index.train)[:6]
    ds = ImageDataset(samples, run.extractors[run.labels[0]].transform)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        eager = net(images)
    cached = model.logits(run.extractors, samples)
    assert torch.allclose(eager, cached, atol=2e-3)
    path = export_onnx(net, tmp_path / "probe.onnx", input_size=tuple(run.sources[run.labels[0]].data_config["input_size"]))
    report = verify_onnx(net, path, images)
    assert report.passed and report.max_abs_diff <= 1e-4
    # each piece matters: without it the cached computation differs from the full graph
    for cut in (dict(flip=False), dict(taps=0), dict(models=run.labels[:1])):
        other = FeatureSpec(**{"models": tuple(run.labels), "taps": 2, "flip": True, **{k: (tuple(v) if k == "models" else v)
                                                                                      for k, v in cut.items()}})
        d = feature_matrix(other, run.extractors, samples).shape[1]
        reduced = ProbeModel(other, model.weight[:, :d], model.bias, 0.01, 1)
        assert not torch.allclose(reduced.logits(run.extractors, samples), cached, atol=1e-3)
    one_head = ProbeModel(spec, model.weight[:1], model.bias[:1], 0.01, 1)
    assert not torch.allclose(one_head.logits(run.extractors, samples), cached, atol=1e-3)


# ----------------------------------------------------------------------------------- the probe trial
def test_probe_trial_trains_on_fit_and_decision_parts_and_scores_on_the_rest(run, monkeypatch):
    from autotl.search import SearchOptions, parse_recipe, plan_search
    from autotl.search import _probe as probe_mod

    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"},
                           "space": {"frozen_stages": ["all"], "dropout_tau": [0.0], "flip": [True]}}, "t")
    plan = plan_search(run, TrainConfig(objective="accuracy"), SearchOptions(trials=1, recipe=recipe, cv_folds=3, cv_repeats=1))
    seen = {}
    real = probe_mod.fold_training

    def spy(objective, params, setup):
        sets, contexts = real(objective, params, setup)
        seen["sets"], seen["refs"] = sets, [c.reference for c in contexts]
        seen["memories"] = [c.memory for c in contexts]
        return sets, contexts

    monkeypatch.setattr(probe_mod, "fold_training", spy)
    trial = plan.run_trials().study.get_trials()[0]
    assert trial.state.name == "COMPLETE" and trial.user_attrs["probe"]
    for fold, train, ref in zip(plan.selection.folds, seen["sets"], seen["refs"]):
        paths = {s.path for s in train}
        assert {s.path for s in fold.decide} <= paths  # the decision part trains (dropout never drops it)
        assert paths <= {s.path for s in fold.train} | {s.path for s in fold.decide}
        assert not paths & {s.path for s in fold.score}
        assert [s.path for s in ref] == [s.path for s in fold.decide]
    ua = trial.user_attrs
    path = ua["penalty_path"]
    assert len(path["fold_scores"]) == len(path["fold_accuracy"]) == len(path["oof_loss"]) == len(path["lambdas"])
    assert ua["lambda"] in path["lambdas"] and ua["fold_scores"] == path["fold_scores"][path["lambdas"].index(ua["lambda"])]
    assert trial.value == pytest.approx(np.mean(ua["fold_scores"]))
    # each fold's dropout kept its influence in the run's memory (what the next trial with another tau reads)
    from autotl.dropout.strategy import cache_stats

    assert seen["memories"] and all(m is run.memory for m in seen["memories"])
    assert cache_stats(run.memory)["influence_solves"] >= len(plan.selection.folds)


def test_a_search_in_its_own_storage_samples_without_the_constant_liar(run):
    """Its TPE proposes from trials that have ended (the liar writes each proposal to the storage
    for other processes, and reads the study once per parameter group)."""
    from autotl.search import SearchOptions, parse_recipe, plan_search

    recipe = parse_recipe({"trials": 4, "pruner": {"type": "none"}, "sampler": {"n_startup_trials": 1},
                           "space": {"frozen_stages": ["all"], "dropout_tau": [None, 0.0, 1.0], "flip": [True, False]}},
                          "t")
    plan = plan_search(run, TrainConfig(objective="accuracy"), SearchOptions(trials=4, recipe=recipe, cv_folds=3,
                                                                             cv_repeats=1))
    trials = plan.run_trials().study.get_trials()
    assert len(trials) == 4 and not any(t.system_attrs for t in trials)


def test_portfolio_is_enqueued_cheapest_first(run):
    from autotl.search import SearchOptions, parse_recipe, plan_search

    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"},
                           "baselines": [{"frozen_stages": 0}, {"frozen_stages": "all", "backbones": "1+2", "flip": True},
                                         {"frozen_stages": "all", "backbones": "1"}],
                           "space": {"frozen_stages": ["all", 0], "backbones": {"choices": ["1", "1+2"], "when": {"frozen_stages": "all"}},
                                     "flip": {"choices": [False, True], "when": {"frozen_stages": "all"}}}}, "t")
    # (5 epochs: on 24 tiny images one epoch of a full fine-tune costs about what the flipped views' pass does)
    plan = plan_search(_scored(run), TrainConfig(objective="accuracy", epochs=5),
                       SearchOptions(trials=1, recipe=recipe, cv_folds=2, cv_repeats=1))
    order = [b.get("frozen_stages") for b in plan.recipe.baselines]
    assert order[-1] == 0  # the full fine-tune waits until every cheap probe of the portfolio has run
    assert plan.recipe.baselines[0] == {"frozen_stages": "all", "backbones": "1"}


def test_a_probes_estimate_counts_the_frozen_passes_it_owes_and_later_portfolio_entries_are_judged(run):
    """A flipped view not computed yet costs a whole forward of every labelled image (the scoring
    pass computed the center views only); once computed it costs nothing. After a trial completed, a
    portfolio entry that cannot finish before the deadline is not started."""
    import time

    import optuna
    from optuna.trial import TrialState

    from autotl.search import SearchOptions, parse_recipe, plan_search

    recipe = parse_recipe({"trials": 2, "pruner": {"type": "none"},
                           "baselines": [{"backbones": "1", "flip": False}, {"backbones": "1+2", "flip": True}],
                           "space": {"frozen_stages": "all", "backbones": {"choices": ["1", "1+2"]},
                                     "flip": {"choices": [False, True]}}}, "t")
    plan = plan_search(_scored(run), TrainConfig(objective="accuracy", epochs=1),
                       SearchOptions(trials=2, recipe=recipe, cv_folds=2, cv_repeats=1))
    objective = plan.objective
    labels = objective.candidates
    n = len(run.index.train) + len(run.index.val)
    assert all(objective.cost.forward[label] > 0 for label in labels)
    center, flipped = objective.probe_spec({"backbones": "1+2"}), objective.probe_spec({"backbones": "1+2", "flip": True})
    assert objective.owed_pass_seconds(center) == 0.0  # the scoring pass computed them
    want = n * sum(objective.cost.forward[label] + objective.cost.decode for label in labels)
    assert objective.owed_pass_seconds(flipped) == pytest.approx(want)

    # the first portfolio entry runs; the second (flip, estimated at its owed passes) does not fit 1 s
    objective.cost.forward = {label: 10.0 for label in labels}  # ten seconds an image: cannot finish
    objective.deadline, objective.budget = time.monotonic() + 600.0, 600.0
    study = optuna.create_study(direction="maximize")
    for params in plan.recipe.baselines:
        study.enqueue_trial(dict(params), user_attrs={"baseline": True})
    study.optimize(objective, n_trials=1)
    objective.deadline = time.monotonic() + 1.0
    study.optimize(objective, n_trials=1)
    first, second = study.trials
    assert first.state == TrialState.COMPLETE and second.state == TrialState.PRUNED
    assert second.user_attrs["estimated_seconds"] >= 10.0 * n and "allowed" in second.user_attrs["not_started"]
    for label in labels:  # nothing pushed the flipped images through a backbone
        assert not run.extractors[label].cached(list(run.index.train), "flip")


# ----------------------------------------------------------------------------------- LP-FT and WiSE-FT
def test_lp_ft_starts_from_the_solved_probe_head(tmp_path, make_image_folder):
    from autotl.finetune import LinearProbeInit, solve_probe_head
    from autotl.train import TrainingHooks, train_model

    index = scan_dataset(make_image_folder(tmp_path / "d", {"a": 8, "b": 8}, size=(40, 40)))
    source = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(source, cache_dir=None)
    acts = ex.extract(index.train)
    weight, bias = solve_probe_head(acts.pooled, acts.labels, 2, 0.05)
    seen = {}

    class Capture(TrainingHooks):
        def setup(self, run):
            seen["w"], seen["b"] = run.net.head.weight.detach().clone(), run.net.head.bias.detach().clone()

    notes = {}
    train_model(source, index.train, index.val, 2, TrainConfig(frozen_stages=-1, epochs=1, batch_size=8), extractor=ex,
                hooks=[LinearProbeInit(ex, index.train, 2, 0.05, notes), Capture()])
    assert torch.allclose(seen["w"], weight, atol=1e-5) and torch.allclose(seen["b"], bias, atol=1e-5)
    assert notes["lp_init"] is True


def test_wise_ft_interpolates_between_start_and_fine_tuned_weights(tmp_path, make_image_folder):
    from autotl.finetune import WeightInterpolation
    from autotl.train import TrainingHooks, changeable_state, train_model

    index = scan_dataset(make_image_folder(tmp_path / "d", {"a": 8, "b": 8}, size=(40, 40)))
    source = create_source_model("test_efficientnet=random")
    ex = FeatureExtractor(source, cache_dir=None)
    states = {}

    class Snap(TrainingHooks):
        def setup(self, run):
            states["start"] = {k: v.clone() for k, v in changeable_state(run.net).items()}

        def end_training(self, net, evaluate):
            states["end"] = {k: v.clone() for k, v in changeable_state(net).items()}

    notes = {}
    cfg = TrainConfig(frozen_stages=-1, epochs=2, batch_size=8, lr=0.05)
    res = train_model(source, index.train, index.val, 2, cfg, extractor=ex, hooks=[Snap(), WeightInterpolation(0.25, notes)])
    got = changeable_state(res.net)
    key = next(k for k, v in got.items() if v.is_floating_point() and not torch.equal(states["start"][k], states["end"][k]))
    want = states["start"][key] + 0.25 * (states["end"][key] - states["start"][key])
    assert torch.allclose(got[key], want, atol=1e-6)
    chooser_notes = {}
    train_model(source, index.train, index.val, 2, cfg, extractor=ex, hooks=[WeightInterpolation(None, chooser_notes)])
    assert chooser_notes["wise_alpha"] in (0.2, 0.4, 0.6, 0.8, 1.0)
    assert chooser_notes["refit"] == {"wise_alpha": chooser_notes["wise_alpha"]}


# ----------------------------------------------------------------------------------- estimate
def test_selection_bias_is_the_mean_per_fold_gap_to_the_best():
    from autotl.estimate import corrected_cv, selection_bias, wilson_interval

    selected = [0.8, 0.9, 1.0]
    others = [[0.9, 0.8, 1.0], [0.7, 1.0, 0.9]]
    assert selection_bias(selected, [selected, *others]) == pytest.approx((0.1 + 0.1 + 0.0) / 3)
    est = corrected_cv(selected, [selected, *others], se=0.05, n_scored=30)
    assert est.accuracy == pytest.approx(0.9 - 0.2 / 3) and est.low < est.accuracy < est.high
    lo, hi = wilson_interval(45, 50)
    assert lo < 0.9 < hi and hi <= 1.0


def test_bagged_refit_ships_every_fold_model_and_the_choice_is_nested(run):
    from autotl.search import SearchOptions, parse_recipe, plan_search
    from autotl.search._probe import compare_bagging, cross_validate_probe, refit_probe

    recipe = parse_recipe({"trials": 1, "pruner": {"type": "none"}, "space": {"frozen_stages": ["all"]}}, "t")
    plan = plan_search(run, TrainConfig(objective="accuracy"), SearchOptions(trials=1, recipe=recipe, cv_folds=3, cv_repeats=1))
    objective = plan.objective
    params = {"frozen_stages": "all", "model": run.labels[0]}
    setup = objective.setup(params)
    cv = cross_validate_probe(objective, params, setup)
    labelled = list(run.index.train) + list(run.index.val)
    bagged, _ = refit_probe(objective, params, setup, cv.lam, 10, labelled, bag=True)
    single, _ = refit_probe(objective, params, setup, cv.lam, 10, labelled, bag=False)
    assert bagged.training["heads"] == len(plan.selection.folds) and single.training["heads"] == 1
    assert not torch.allclose(bagged.logits(labelled), single.logits(labelled), atol=1e-4)
    report = compare_bagging(objective, params, setup, cv.lam)
    assert set(report) >= {"single_refit", "bag", "use_bag"}
    assert report["use_bag"] == (report["bag"]["log_loss"] <= report["single_refit"]["log_loss"]
                                 and report["bag"]["accuracy"] >= report["single_refit"]["accuracy"])


def test_run_memory_is_bounded_by_items_and_bytes():
    from autotl._memory import BoundedMemory

    class Blob:
        def __init__(self, n):
            self.nbytes = n

    mem = BoundedMemory(max_items=3, max_bytes=100)
    for i in range(5):
        mem.get(i, lambda: Blob(10))
    assert len(mem) == 3 and 4 in mem and 0 not in mem  # least recently used go first
    mem.get("big", lambda: Blob(95))
    assert len(mem) == 1 and "big" in mem  # over the byte budget: only the newest stays
    assert mem.get("big", lambda: Blob(1)).nbytes == 95 and mem.hits == 1


def test_a_val_folder_scores_alone_only_when_its_labels_are_cleaner(tmp_path, make_image_folder):
    """train/ with many wrong labels: val/ (clean) scores trials alone (val-cv); the same images with
    clean labels everywhere: every labelled image scores (cv)."""
    import shutil

    from autotl.search._fit import _val_check
    from autotl.search._folds import plan_selection

    clean = make_image_folder(tmp_path / "clean", {"a": (16, 8), "b": (16, 8)}, splits=["train", "val"], size=(40, 32))
    noisy = tmp_path / "noisy"
    shutil.copytree(clean, noisy)
    train_a, train_b = sorted((noisy / "train" / "a").iterdir()), sorted((noisy / "train" / "b").iterdir())
    for f in train_a[:7]:  # swap 7 of 16 labels each way
        f.rename(noisy / "train" / "b" / f"from_a_{f.name}")
    for f in train_b[:7]:
        f.rename(noisy / "train" / "a" / f"from_b_{f.name}")
    checks = {}
    for name, root in (("clean", clean), ("noisy", noisy)):
        r = Run.open(root, tmp_path / f"run-{name}", models=["test_efficientnet=random"], device="cpu",
                     cache_dir=tmp_path / "cache")
        checks[name] = _val_check(r)
        kind = plan_selection(r.index, trust_val=checks[name]["val_cleaner"]).kind
        assert kind == ("val-cv" if name == "noisy" else "cv"), (name, checks[name])
    assert checks["noisy"]["train_oof_accuracy"] < checks["clean"]["train_oof_accuracy"]


def test_probe_members_of_an_ensemble_are_one_graph_with_each_backbone_once(run, tmp_path):
    """Probes on different layouts merged: the same probabilities as the members averaged, through
    one graph that runs every backbone once (ONNX parity included)."""
    from autotl.ensemble import EnsembleMember, ensemble_logits, ensemble_net
    from autotl.export import export_onnx, verify_onnx
    from autotl.features import ImageDataset
    from autotl.fitted import fitted_probe

    a = _probe_model(run, FeatureSpec(tuple(run.labels[:1]), taps=0, flip=False), heads=1)
    b = _probe_model(run, FeatureSpec(tuple(run.labels), taps=2, flip=True), heads=2)
    source = run.sources[run.labels[0]]
    members = [EnsembleMember(fitted_probe(m, run.extractors, source), w, f"m{i}") for i, (m, w) in enumerate(((a, 0.75), (b, 0.25)))]
    net = ensemble_net(members)
    assert len(net.members) == 1  # both probes in one merged probe graph
    backbone_runs = sum(len(s) > 0 for s in net.members[0].stages)
    assert backbone_runs == len(run.labels)
    samples = list(run.index.val) + list(run.index.train)[:5]
    ds = ImageDataset(samples, run.extractors[run.labels[0]].transform)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    want, _ = ensemble_logits(members, samples)
    with torch.no_grad():
        got = net(images)
    assert torch.allclose(got, want, atol=2e-3)
    path = export_onnx(net, tmp_path / "ens.onnx", input_size=tuple(source.data_config["input_size"]))
    assert verify_onnx(net, path, images).passed
