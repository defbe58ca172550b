"""Ensembles: greedy selection on out-of-fold probabilities, one graph for many members, the search wiring."""

from __future__ import annotations

import types

import numpy as np
import optuna
import pytest
import torch

from autotl.ensemble import (PROB_FLOOR, EnsembleNet, InputAdapter, decode_probs, encode_probs, greedy_ensemble,
                             log_loss)
from autotl.models import create_source_model
from autotl.stages import TransferNet

pytestmark = pytest.mark.usefixtures("single_thread")


def _noisy_probs(labels, n_classes, skill, rng):
    """Probabilities that put ``skill`` of the mass on the true class of a random subset of rows."""
    logits = rng.normal(size=(len(labels), n_classes))
    logits[np.arange(len(labels)), labels] += skill * rng.random(len(labels)) * 4
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(5))
def test_greedy_never_picks_a_member_that_raises_the_loss(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=120)
    candidates = [_noisy_probs(labels, 4, skill, rng) for skill in (1.0, 0.8, 0.6, 0.0, 0.0)]
    sel = greedy_ensemble(candidates, labels)
    # every pick strictly lowered the averaged out-of-fold loss, starting from the best single member
    singles = [log_loss(p, labels) for p in candidates]
    assert sel.losses[0] == pytest.approx(min(singles))
    assert all(b < a for a, b in zip(sel.losses, sel.losses[1:]))
    running = np.zeros_like(candidates[0])
    for k, i in enumerate(sel.picks):
        before = log_loss(running / k, labels) if k else np.inf
        running += candidates[i]
        assert log_loss(running / (k + 1), labels) < before
    # and the final weights reproduce the last loss
    assert log_loss(sel.probs(candidates), labels) == pytest.approx(sel.losses[-1])


def test_greedy_leaves_out_a_harmful_member_and_caps_members():
    labels = np.array([0, 1] * 30)
    good = np.eye(2)[labels] * 0.8 + 0.1
    wrong = np.eye(2)[1 - labels] * 0.98 + 0.01  # confidently wrong: adding it always raises the loss
    sel = greedy_ensemble([wrong, good], labels)
    assert sel.counts[0] == 0 and sel.members == [1]
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=90)
    many = [_noisy_probs(labels, 3, 1.0, rng) for _ in range(8)]
    assert len(greedy_ensemble(many, labels, max_members=2).members) <= 2


def test_probs_roundtrip_through_user_attr_text():
    p = np.random.default_rng(0).random((7, 3)).astype(np.float32)
    assert np.array_equal(decode_probs(encode_probs(p)), p)


def _member(source, n_classes, frozen, seed):
    net = TransferNet.from_source(source.model, n_classes, frozen, seed=seed)
    with torch.no_grad():  # a trained-looking suffix: perturb the trainable part so members differ
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    return net.eval()


def test_ensemble_onnx_equals_the_mean_of_member_probabilities(tmp_path):
    import onnxruntime as ort

    from autotl.export import export_onnx

    a = create_source_model("test_efficientnet=random")
    b = create_source_model("resnet10t@48=random")
    cfg_a, cfg_b = dict(a.data_config), dict(b.data_config)
    n_a = len(TransferNet.from_source(a.model, 3, 0).stages)
    members = [_member(a, 3, "all", 1), _member(a, 3, n_a - 1, 2), _member(b, 3, "all", 3)]
    weights = [0.5, 0.25, 0.25]
    ens = EnsembleNet(members, weights, [cfg_a, cfg_a, cfg_b], share_keys=["a", "a", "b"]).eval()
    # the two members on backbone "a" share their frozen prefix: one group, cut at the shallower one
    assert sorted(len(idx) for idx, _ in ens.groups) == [1, 2]
    x = torch.randn(5, *cfg_a["input_size"])
    with torch.no_grad():
        expected = sum(w * torch.softmax(m(adapt(x)), 1) for m, w, adapt in
                       zip(members, weights, [torch.nn.Identity(), torch.nn.Identity(), InputAdapter(cfg_a, cfg_b)]))
        assert torch.allclose(ens(x).exp(), expected, atol=1e-6)
    path = export_onnx(ens, tmp_path / "ens.onnx", input_size=tuple(cfg_a["input_size"]))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    assert np.abs(np.exp(got) - expected.numpy()).max() <= 1e-4


def test_input_adapter_resizes_and_renormalises():
    primary = {"input_size": (3, 8, 8), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    member = {"input_size": (3, 4, 4), "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    x = torch.zeros(1, 3, 8, 8)  # = 0.5 grey in [0, 1] under the primary's normalisation
    out = InputAdapter(primary, member)(x)
    assert out.shape == (1, 3, 4, 4) and torch.allclose(out, torch.full_like(out, 0.5))


def _study_with_oof(probs_by_trial, values):
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, (p, v) in enumerate(zip(probs_by_trial, values)):
        study.add_trial(optuna.trial.create_trial(params={"x": i / 10}, distributions=dist, value=v,
                                                  user_attrs={"oof": encode_probs(p)}))
    return study


def test_choose_ensemble_uses_only_a_better_ensemble():
    from autotl.search._fit import choose_ensemble

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=60)
    samples = [types.SimpleNamespace(label=int(y), path=f"{i}.png") for i, y in enumerate(labels)]
    plan = types.SimpleNamespace(selection=types.SimpleNamespace(scored_samples=samples),
                                 objective=types.SimpleNamespace(base=types.SimpleNamespace(objective="accuracy")))
    # three weak, independent members: their average beats each
    probs = [_noisy_probs(labels, 3, 0.7, rng) for _ in range(3)]
    study = _study_with_oof(probs, [0.6, 0.6, 0.6])
    best = study.trials[0]
    chosen = choose_ensemble(plan, study, best, None)
    assert chosen.doc["used"] and chosen.trials[0].number == best.number and len(chosen.trials) >= 2
    assert chosen.doc["oof_log_loss"]["ensemble"] < chosen.doc["oof_log_loss"]["selected_trial"]
    assert sum(chosen.weights) == pytest.approx(1.0)
    # a perfect selected trial and a worse one: greedy keeps the one member -> no ensemble
    perfect = np.eye(3)[labels] * 0.9 + 0.1 / 3
    study = _study_with_oof([perfect, probs[0]], [1.0, 0.6])
    chosen = choose_ensemble(plan, study, study.trials[0], None)
    assert not chosen.doc["used"] and chosen.trials == []


def test_fit_publishes_an_ensemble_as_one_verified_graph(tmp_path, make_image_folder, monkeypatch):
    """refit of every member → one EnsembleNet → ONNX + parity → card with members and latency."""
    import json

    import autotl.search._fit as fit_mod
    from autotl.fit import fit
    from autotl.predict import predict

    data = make_image_folder(tmp_path / "d", {"cat": 10, "dog": 10}, size=(32, 32))
    real = fit_mod.choose_ensemble
    refits = []
    real_refit = fit_mod._refit

    def refit(plan, trial, params, labelled):
        refits.append(trial.number)
        return real_refit(plan, trial, params, labelled)

    def forced(plan, study, best, params_of):
        got = real(plan, study, best, params_of)
        other = next(t for t in study.get_trials(deepcopy=False) if t.number != best.number and t.state.name == "COMPLETE")
        return fit_mod.ChosenEnsemble([best, other], [0.75, 0.25], {**(got.doc or {}), "used": True})

    monkeypatch.setattr(fit_mod, "choose_ensemble", forced)
    monkeypatch.setattr(fit_mod, "_refit", refit)
    recipe = {"trials": 3, "sampler": {"n_startup_trials": 3}, "pruner": {"type": "none"},
              "space": {"model": {"top_k": 2}, "frozen_stages": "all", "lr": {"low": 0.001, "high": 0.03, "log": True},
                        "epochs": 2}}
    res = fit(data, tmp_path / "run", models=["test_efficientnet=random", "resnet10t@48=random"], recipe=recipe,
              trials=3, cv_folds=2, device="cpu")
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    members = card["extra"]["ensemble"]["members"]
    assert [m["weight"] for m in members] == [0.75, 0.25] and len(set(refits)) == 2
    assert res.parity["passed"] and card["extra"]["ensemble"]["latency_ms_batch1_pytorch_cpu"]["ensemble"] > 0
    assert "ensemble_selection" in card["extra"]["decided_by"]
    out = predict(res.model_path, data, top_k=1)
    assert not out.errors and len(out.labels) == 20


def test_an_ensemble_without_the_selected_trial_ships_its_primary_members_input(tmp_path, make_image_folder, monkeypatch):
    """The selected trial is not a member, and the members sit on backbones with different native
    input sizes: the graph's input, the card's preprocessing and what predict feeds agree, so
    predict (torch-free) gives the ensemble's probabilities as computed through the caches."""
    import json

    import onnxruntime as ort

    import autotl.search._fit as fit_mod
    from autotl.data import scan_dataset
    from autotl.ensemble import ensemble_logits
    from autotl.fit import fit
    from autotl.predict import predict

    data = make_image_folder(tmp_path / "d", {"cat": 10, "dog": 10}, size=(32, 32))
    models = ["test_efficientnet=random", "resnet10t@48=random"]  # native inputs 160 and 48 px
    picked: dict = {}
    real_select = fit_mod.select_one_se

    def model_of(t):
        return t.params["model"]

    def select(trials, params_of, **kw):
        """The real rule, then overridden: a trial on a model with a second complete trial."""
        _, rule = real_select(trials, params_of, **kw)
        done = [t for t in trials if t.state.name == "COMPLETE"]
        by_model: dict = {}
        for t in done:
            by_model.setdefault(model_of(t), []).append(t)
        assert len(by_model) == 2 and max(len(v) for v in by_model.values()) >= 2, "need trials on both models"
        crowded = max(by_model, key=lambda m: len(by_model[m]))
        other = next(m for m in by_model if m != crowded)
        picked.update(selected=by_model[crowded][0], members=[by_model[other][0], by_model[crowded][1]])
        return picked["selected"], rule

    def choose(plan, study, best, params_of):
        assert best.number == picked["selected"].number
        # primary on the other backbone, second on the selected trial's backbone; the selected trial left out
        return fit_mod.ChosenEnsemble(list(picked["members"]), [0.6, 0.4], {"used": True, "candidates": 2})

    real_members = fit_mod._refit_members

    def refit_members(*args, **kw):
        picked["refitted"] = real_members(*args, **kw)
        return picked["refitted"]

    monkeypatch.setattr(fit_mod, "select_one_se", select)
    monkeypatch.setattr(fit_mod, "choose_ensemble", choose)
    monkeypatch.setattr(fit_mod, "_refit_members", refit_members)
    recipe = {"trials": 5, "sampler": {"n_startup_trials": 5}, "pruner": {"type": "none"},
              "space": {"model": {"top_k": 2}, "frozen_stages": "all", "lr": {"low": 0.001, "high": 0.03, "log": True},
                        "epochs": 2}}
    res = fit(data, tmp_path / "run", models=models, recipe=recipe, trials=5, cv_folds=2, device="cpu", seed=1)
    members = picked["refitted"]
    assert [m.source.label for m in members] == [picked["members"][0].params["model"], picked["members"][1].params["model"]]
    assert len({m.source.label for m in members}) == 2 and picked["selected"].number not in {
        t.number for t in picked["members"]}

    card = json.loads((tmp_path / "run" / "model.json").read_text())
    sess = ort.InferenceSession(str(res.model_path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[1:] == card["preprocessing"]["input_size"]
    assert card["extra"]["ensemble"]["members"][0]["model"] == members[0].source.label
    assert card["source_model"]["name"] == members[0].source.label  # the card names the graph's primary

    index = scan_dataset(data)
    samples = sorted(index.train + index.val, key=lambda s: str(s.path))
    expected = ensemble_logits(members, samples)[0].numpy()  # log-probabilities, floored like the graph's
    out = predict(res.model_path, [s.path for s in samples], top_k=2)
    assert not out.errors
    got = np.array([[dict((t["label"], t["prob"]) for t in p["top"])[c] for c in card["classes"]]
                    for p in out.predictions])
    assert [p["path"] for p in out.predictions] == [str(s.path) for s in samples]
    # compared as log-probabilities: confident members saturate probabilities, which then hide a
    # preprocessing mismatch (another crop_pct moves them by 1e-5, their logs by 0.8)
    np.testing.assert_allclose(np.log(np.clip(got, PROB_FLOOR, 1.0)), expected, atol=1e-3)
