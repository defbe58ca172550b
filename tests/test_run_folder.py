"""A run folder is one unit: --out is checked before any work, a finished
run is replaced only with --overwrite (and kept until the new one is published), and a model is
never used with a card that does not describe it."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest

from autotl.card import ModelCard
from autotl.errors import AutotlError
from autotl.fit import fit
from autotl.predict import Predictor

MODEL = "test_efficientnet=random"
fit_module = importlib.import_module("autotl.fit")  # ``autotl.fit`` is the function

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def no_export(monkeypatch):
    """ONNX export is tested elsewhere (and costs tens of seconds here): write a stand-in file."""
    def export(net, source, run_dir, val):
        (run_dir / "model.onnx").write_bytes(b"onnx of " + str(net.head.out_features).encode() + bytes(run_dir.name, "utf8"))
        return {"passed": True, "max_abs_diff": 0.0, "skipped": "test"}

    monkeypatch.setattr(fit_module, "export_and_verify", export)


def _fit(data, out, **kw):
    return fit(data, out, models=[MODEL], epochs=1, batch_size=8, search=False, cache_dir=out.parent / "cache", **kw)


@pytest.fixture
def data(tmp_path, make_image_folder):
    return make_image_folder(tmp_path / "data", {"cat": 4, "dog": 4}, size=(32, 32))


@pytest.mark.parametrize("where", ["data", "inside", "file", "foreign", "finished"])
def test_out_is_refused_before_any_work(where, data, tmp_path, no_export, monkeypatch):
    out = {"data": data, "inside": data / "cat" / "run", "file": tmp_path / "f.txt", "foreign": tmp_path / "mine",
           "finished": tmp_path / "run"}[where]
    if where == "file":
        out.write_text("x")
    if where == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("my own file")
    if where == "finished":
        _fit(data, out)
    scanned = []
    monkeypatch.setattr("autotl.run.scan_dataset", lambda *a, **k: scanned.append(1))
    with pytest.raises(AutotlError, match="--out") as err:
        _fit(data, out)
    assert not scanned, "the data was scanned before --out was refused"
    assert {"data": "overlaps", "inside": "overlaps", "file": "is a file", "foreign": "not an autotl run",
            "finished": "--overwrite"}[where] in str(err.value)
    if where == "foreign":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # nothing written there


def test_overwrite_keeps_the_old_run_until_the_new_one_is_published(data, tmp_path, make_image_folder, no_export,
                                                                   monkeypatch):
    out = tmp_path / "run"
    _fit(data, out)
    for stale in ("study.db", "leaderboard.json", "dropped.csv"):  # files of an earlier search
        (out / stale).write_text("old")
    old_card = (out / "model.json").read_text()
    other = make_image_folder(tmp_path / "other", {"ant": 4, "bee": 4, "fly": 4}, size=(32, 32))

    # interrupted while publishing: the old run is intact beside, no mixed folder
    real_save = ModelCard.save
    monkeypatch.setattr(ModelCard, "save", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _fit(other, out, overwrite=True)
    kept = list(tmp_path.glob("run.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "model.json").read_text() == old_card
    assert not (out / "model.json").exists() and not (out / "study.db").exists()
    monkeypatch.setattr(ModelCard, "save", real_save)

    # the same command again completes the overwrite: one run, the new one, nothing of the old
    res = _fit(other, out, overwrite=True)
    assert res.classes == ["ant", "bee", "fly"] and not list(tmp_path.glob("run.replaced-*"))
    assert not any((out / f).exists() for f in ("study.db", "leaderboard.json", "dropped.csv"))
    assert json.loads((out / "model.json").read_text())["classes"] == ["ant", "bee", "fly"]


def test_a_model_beside_a_card_of_another_run_is_refused(data, tmp_path, make_image_folder):
    """The SIGINT window between writing model.onnx and model.json: simulated by putting a model of
    another run beside the card. predict refuses instead of printing the card's class names."""
    a, b = tmp_path / "a", tmp_path / "b"
    fit(data, a, models=[MODEL], epochs=1, batch_size=8, search=False, cache_dir=tmp_path / "cache")
    other = make_image_folder(tmp_path / "other", {"ant": 4, "bee": 4, "fly": 4}, size=(32, 32))
    fit(other, b, models=[MODEL], epochs=1, batch_size=8, search=False, cache_dir=tmp_path / "cache")
    card = json.loads((a / "model.json").read_text())
    assert len(card["model_sha256"]) == 64
    Predictor(a)  # the pair as written loads
    shutil.copyfile(b / "model.onnx", a / "model.onnx")
    with pytest.raises(AutotlError, match="is not the model its card"):
        Predictor(a)


def test_no_interrupt_leaves_a_model_beside_a_card_that_does_not_describe_it(data, tmp_path, monkeypatch, no_export):
    """Interrupts injected (a) while model.onnx is written and (b) between model.onnx and model.json,
    into a run folder that already holds a published model (a resumed run): afterwards either the
    old pair is intact, or there is no card at all — never the new model beside the old card."""
    from autotl.card import check_model_matches

    out = tmp_path / "run"
    _fit(data, out)
    old_model, old_card = (out / "model.onnx").read_bytes(), (out / "model.json").read_text()

    def interrupted_export(net, source, run_dir, val):
        raise KeyboardInterrupt  # before the new model file is in place

    monkeypatch.setattr(fit_module, "export_and_verify", interrupted_export)
    # (a) the old card is put back beside the untouched old model
    run, final = _published_parts(data, out)
    with pytest.raises(KeyboardInterrupt):
        fit_module.publish(run, final)
    assert (out / "model.onnx").read_bytes() == old_model and (out / "model.json").read_text() == old_card

    # (b) the new model is written, then the interrupt comes before its card
    def new_model_then_interrupt(net, source, run_dir, val):
        (run_dir / "model.onnx").write_bytes(b"a different model")
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "export_and_verify", new_model_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit_module.publish(run, final)
    assert not (out / "model.json").exists()  # no card rather than a wrong one
    card = ModelCard.load(out / "model.json.previous")
    with pytest.raises(AutotlError, match="not the model"):
        check_model_matches(card, out / "model.onnx", out / "model.json.previous")


def _published_parts(data, out):
    """A Run and FinalModel for ``publish``, as fit builds them (into the existing run folder)."""
    from autotl.fit import _base_config, train_given_strategy
    from autotl.run import Run

    run = Run.open(data, out, models=[MODEL], device="cpu", cache_dir=out.parent / "cache", resume=True)
    base = _base_config(run.index, None, frozen_stages="all", epochs=1, lr=3e-3, batch_size=8, seed=0, objective=None)
    return run, train_given_strategy(run, base, {}, {})
