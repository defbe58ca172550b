"""A run folder is one unit: --out is checked before any work, a finished run is replaced only with
--overwrite (kept until the new one is published, put back on any failure), files autotl did not
write are never moved or deleted, one process owns the folder at a time, and a model is never used
with a card that does not describe it."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

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


def _listing(folder):
    """Every file under ``folder`` with its bytes (the lock and set-aside names must not appear)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_keeps_the_old_run_until_the_new_one_is_published(data, tmp_path, make_image_folder, no_export,
                                                                   monkeypatch):
    out = tmp_path / "run"
    _fit(data, out)
    for stale in ("study.db", "leaderboard.json", "dropped.csv"):  # files of an earlier search
        (out / stale).write_text("old")
    before = _listing(out)
    other = make_image_folder(tmp_path / "other", {"ant": 4, "bee": 4, "fly": 4}, size=(32, 32))

    # interrupted while publishing: the old run is back in place, whole, and nothing of the new one
    real_save = ModelCard.save
    monkeypatch.setattr(ModelCard, "save", lambda self, path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        _fit(other, out, overwrite=True)
    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "other", "run"]  # nothing beside it either
    monkeypatch.setattr(ModelCard, "save", real_save)

    # the same command again replaces it: one run, the new one, nothing of the old
    res = _fit(other, out, overwrite=True)
    assert res.classes == ["ant", "bee", "fly"]
    assert not any((out / f).exists() for f in ("study.db", "leaderboard.json", "dropped.csv", ".autotl-replaced",
                                                ".autotl.lock"))
    assert json.loads((out / "model.json").read_text())["classes"] == ["ant", "bee", "fly"]


FAILURES = {  # what fails after --out was touched: each an AutotlError (exit 2)
    "frozen_stages": dict(frozen_stages=99),
    "model": dict(models=["no_such_model_at_all=random"]),
    "checkpoint": dict(models=["test_efficientnet=CHECKPOINT"]),
    "focus_class": dict(fixed_params={"dropout_tau": 0}, options={"focus_class": "zebra"}),
    "storage": dict(search=True, trials=1, storage="bogus://nowhere", recipe="quick"),
}


def _failing_fit(data, out, failure, tmp_path, **kw):
    kwargs = {"models": [MODEL], "epochs": 1, "batch_size": 8, "search": False, "cache_dir": tmp_path / "cache",
              **FAILURES[failure], **kw}
    if kwargs["models"] == ["test_efficientnet=CHECKPOINT"]:
        bad = tmp_path / "bad.pth"
        bad.write_bytes(b"not a checkpoint")
        kwargs["models"] = [f"test_efficientnet={bad}"]
    with pytest.raises(AutotlError):
        fit(data, out, **kwargs)


@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_overwrite_puts_the_old_run_back_and_a_failed_new_run_leaves_nothing(failure, data, tmp_path, no_export,
                                                                                     capsys):
    out = tmp_path / "run"
    _fit(data, out)
    (out / "notes.txt").write_text("my notes")  # the user's: never moved or deleted
    before = _listing(out)
    capsys.readouterr()
    _failing_fit(data, out, failure, tmp_path, overwrite=True)
    assert _listing(out) == before
    assert "back in place" in " ".join(capsys.readouterr().err.split())

    fresh = tmp_path / "runs" / "fresh"  # created by the failing command, parent included: removed again
    _failing_fit(data, fresh, failure, tmp_path)
    assert not (tmp_path / "runs").exists()
    empty = tmp_path / "empty"  # an existing empty folder stays, empty
    empty.mkdir()
    _failing_fit(data, empty, failure, tmp_path)
    assert list(empty.iterdir()) == []


def test_overwrite_never_deletes_files_autotl_did_not_write(data, tmp_path, no_export, capsys):
    out = tmp_path / "run"
    _fit(data, out)
    (out / "notes.txt").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "plot.png").write_bytes(b"png")
    capsys.readouterr()
    _fit(data, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "my notes" and (out / "mine" / "plot.png").read_bytes() == b"png"
    err = " ".join(capsys.readouterr().err.split())
    assert "keeps mine/, notes.txt as they are" in err


def test_resume_needs_a_search_to_continue(data, tmp_path, no_export):
    out = tmp_path / "run"
    _fit(data, out)
    before = _listing(out)
    with pytest.raises(AutotlError, match=r"--resume: .* fitted without a search .* --overwrite instead of --resume"):
        fit(data, out, models=[MODEL], resume=True, cache_dir=tmp_path / "cache")
    assert _listing(out) == before  # no empty study.db
    with pytest.raises(AutotlError, match="add --overwrite to replace it, or give") as info:
        _fit(data, out)  # and without --resume: no advice to add it back
    assert "--resume" not in str(info.value)
    with pytest.raises(AutotlError, match=r"--resume: .* no search to continue .* drop --resume"):
        fit(data, tmp_path / "new", models=[MODEL], resume=True, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "new").exists()
    with pytest.raises(AutotlError, match="--resume with --overwrite"):
        fit(data, out, models=[MODEL], resume=True, overwrite=True)


def test_an_unfinished_search_is_continued_or_replaced_never_mixed(data, tmp_path, no_export):
    out = tmp_path / "run"
    out.mkdir()
    (out / "autotl-run.json").write_text("{}")
    (out / "study.db").write_text("a failed search")
    with pytest.raises(AutotlError, match=r"unfinished search .* add --overwrite to replace it"):
        _fit(data, out)
    assert (out / "study.db").read_text() == "a failed search"
    _fit(data, out, overwrite=True)
    assert not (out / "study.db").exists() and (out / "model.json").is_file()


def test_an_interrupted_search_is_kept_unless_it_was_replacing_a_finished_run(data, tmp_path, no_export, monkeypatch):
    import autotl.search
    from autotl.search import SearchInterrupted

    def interrupted(run, base, opts):
        (run.run_dir / "study.db").write_text("the new study")
        raise SearchInterrupted("interrupted", run_dir=run.run_dir, study_name="autotl", storage="", finished=1)

    monkeypatch.setattr(autotl.search, "search", interrupted)
    fresh = tmp_path / "fresh"
    with pytest.raises(SearchInterrupted):
        fit(data, fresh, models=[MODEL], trials=2, cache_dir=tmp_path / "cache")
    assert (fresh / "study.db").read_text() == "the new study"  # resumable

    out = tmp_path / "run"
    _fit(data, out)
    before = _listing(out)
    with pytest.raises(SearchInterrupted) as info:
        fit(data, out, models=[MODEL], trials=2, overwrite=True, cache_dir=tmp_path / "cache")
    assert _listing(out) == before and info.value.restored_earlier_run


@pytest.mark.parametrize("killed", ["setting_aside", "training", "after_publishing"])
def test_an_overwrite_killed_anywhere_is_finished_or_undone_next_time(killed, data, tmp_path, no_export):
    """What a SIGKILL during an overwrite leaves, at each stage: the next fit puts the earlier run
    back whole (or, once the new one was published, drops it), never a mix of the two."""
    out = tmp_path / "run"
    _fit(data, out)
    before = _listing(out)
    aside = out / ".autotl-replaced"
    aside.mkdir()
    entries = sorted(p for p in out.iterdir() if p != aside)
    for entry in entries[: len(entries) // 2] if killed == "setting_aside" else entries:
        entry.rename(aside / entry.name)
    if killed != "setting_aside":
        (aside / ".complete").touch()
        (out / "autotl-run.json").write_text("{}")
        (out / "scoring.json").write_text("{} of the new run")
    if killed == "after_publishing":
        (out / "model.json").write_text("the new card")
        with pytest.raises(AutotlError, match="holds an earlier run"):
            _fit(data, out)
        assert not aside.exists() and (out / "model.json").read_text() == "the new card"
        return
    with pytest.raises(AutotlError, match="holds an earlier run"):
        _fit(data, out)
    assert _listing(out) == before and not aside.exists()


# ----------------------------------------------------------------------------------------- one owner
ROOT = Path(importlib.import_module("autotl").__file__).resolve().parents[1]  # subprocesses run the autotl this test imports


def _python(code: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_fit_on_a_folder_in_use_is_refused_at_once(data, tmp_path, no_export, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    holder = _python("import sys, time; from autotl._runfolder import hold_run_folder\n"
                     "with hold_run_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)", out)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        scanned = []
        monkeypatch.setattr("autotl.run.scan_dataset", lambda *a, **k: scanned.append(1))
        with pytest.raises(AutotlError, match=rf"--out {out}: in use by autotl fit \(pid {holder.pid} on "):
            _fit(data, out)
        assert [p.name for p in out.iterdir()] == [".autotl.lock"] and not scanned  # refused before any work
        from autotl.report import write_report

        with pytest.raises(AutotlError, match="in use by autotl fit"):
            write_report(out)
    finally:
        holder.kill()
        holder.wait()


def test_two_real_fits_on_one_folder_and_a_stale_lock(data, tmp_path):
    """Process A holds the folder (it sleeps in its scoring step); B, a real `autotl fit` on the same
    --out, exits 2 at once naming A. A is then killed: its lock file stays, and C takes the folder
    over with a message, and publishes."""
    out = tmp_path / "run"
    args = ["fit", data, "--out", out, "--model", MODEL, "--no-search", "--epochs", "1", "--batch-size", "8",
            "--cache-dir", tmp_path / "cache"]
    code = ("import importlib, sys, time\nf = importlib.import_module('autotl.fit')  # the module (autotl.fit is the function)\n"
            "def slow(*a, **k):\n    print('scoring', flush=True); time.sleep(300)\n"
            "f.score_candidates = slow\nfrom autotl.cli import main\nsys.exit(main(sys.argv[1:]))")
    a = _python(code, *args)
    try:
        assert a.stdout.readline().strip() == "scoring", a.stderr.read()
        b = subprocess.run([sys.executable, "-m", "autotl", *map(str, args)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert b.returncode == 2 and "Traceback" not in b.stderr, b.stderr
        assert f"in use by autotl fit (pid {a.pid} on " in b.stderr
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert json.loads((out / ".autotl.lock").read_text())["pid"] == a.pid  # what a killed process leaves
    c = subprocess.run([sys.executable, "-m", "autotl", *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert c.returncode == 0, c.stderr[-2000:]
    assert f"taking over from autotl fit (pid {a.pid} on" in " ".join(c.stderr.split())
    assert (out / "model.onnx").is_file() and not (out / ".autotl.lock").exists()


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
    from autotl.options import FitOptions
    from autotl.run import Run

    run = Run.open(data, out, models=[MODEL], device="cpu", cache_dir=out.parent / "cache", resume=True)
    base = _base_config(run.index, FitOptions(frozen_stages="all", epochs=1, lr=3e-3, batch_size=8, seed=0))
    return run, train_given_strategy(run, base, {}, {})
