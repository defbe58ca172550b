"""``autotl report``: the self-contained HTML page about a run.

Most tests build a fake run folder by writing the artefacts directly (JSON, CSV, tiny images, a
small Optuna study); one fits a tiny real model.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from autotl.errors import AutotlError
from autotl import _console
from autotl.cli import main
from autotl.report import build_html, load_run, write_report
from autotl.report._evaluation import per_class

EVIL = "<script>alert(1)</script>"
EVIL_FILE = "<img src=x onerror=alert(2)>.png"
CLASSES = ["cat", "dog", EVIL]
SECTIONS = ("strategy", "data", "scoring", "search", "evaluation", "dropout", "retrieval", "onnx")


def _image(path: Path, colour: tuple[int, int, int], size=(40, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8) + np.array(colour, np.uint8)
    arr[::4] = 255 - arr[::4]
    Image.fromarray(arr).save(path)
    return path


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def _study(run: Path) -> str:
    """A small real Optuna study in RUN/study.db: 4 complete, 1 pruned, 1 failed trial."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    url = f"sqlite:///{(run / 'study.db').resolve()}"
    study = optuna.create_study(storage=url, study_name="autotl", direction="maximize")
    dists = {"frozen_stages": CategoricalDistribution(["all", -1]), "lr": FloatDistribution(1e-4, 1e-1, log=True),
             "epochs": IntDistribution(2, 20)}
    plan = [("all", 3e-3, 15, 0.80, "ok"), (-1, 1e-3, 4, 0.90, "ok"), ("all", 2e-2, 8, 0.70, "ok"),
            (-1, 5e-4, 3, 0.85, "ok"), ("all", 5e-2, 5, 0.40, "pruned"), (-1, 1e-2, 2, None, "fail")]
    for fs, lr, ep, value, how in plan:
        study.enqueue_trial({"frozen_stages": fs, "lr": lr, "epochs": ep})
        t = study.ask(dists)
        t.set_user_attr("seconds", 1.5)
        if value is not None:
            t.report(value - 0.1, 0)
            t.report(value, 1)
        if how == "ok":
            study.tell(t, value)
        elif how == "pruned":
            study.tell(t, state=TrialState.PRUNED)
        else:
            t.set_user_attr("error", "RuntimeError: out of memory")
            study.tell(t, state=TrialState.FAIL)
    return url


def make_fake_run(run: Path, *, study: bool = True) -> Path:
    """A run folder with every artefact the report reads (the tests' and bench/render_report.py's)."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    data = run.parent / f"{run.name}-data"
    pool = run.parent / f"{run.name}-pool"
    colours = {"cat": (200, 60, 60), "dog": (60, 160, 60), EVIL: (60, 60, 200)}
    train = {c: [_image(data / "train" / f"class{k}" / f"{c[:3] if k < 2 else 'x'}_{i}.png", colours[c]) for i in range(4)]
             for k, c in enumerate(CLASSES)}
    pool_imgs = [_image(pool / f"n0{k}" / f"p{k}_{i}.jpg", (40 * k + 30, 90, 150)) for k in range(3) for i in range(3)]
    counts = {c: {"train": 12 + 3 * k, "val": 4, "test": 3} for k, c in enumerate(CLASSES)}
    dataset = {"root": str(data), "classes": CLASSES, "split": "folders", "n_train": 45, "n_val": 12, "n_test": 9,
               "counts": counts, "fingerprint": "f" * 64,
               "skipped": [{"path": str(data / "train" / "class0" / EVIL_FILE), "reason": "cannot identify image file"},
                           {"path": str(data / "train" / "class1" / "empty.jpg"), "reason": "empty file (0 bytes)"}]}
    training = {"frozen_stages": 6, "num_stages": 7, "stage_names": ["stem", "s1", "s2", "s3", "s4", "s5", "head"],
                "lr": 0.001, "epochs": 4, "batch_size": 64, "optimizer": "adamw", "weight_decay": 1e-4,
                "label_smoothing": 0.1, "backbone_lr_ratio": 0.1, "objective": "accuracy", "regularizer": "l2sp",
                "reg_lambda": 0.01, "reg_beta": 0.001, "reg_decay": 1.0, "dtnh": False, "best_epoch": 2, "n_train": 41,
                "cached_prefix": True, "strategies": {
                    "dropout": {"tau": 2.0, "mode": "spread", "threshold": 0.1, "n_total": 45, "n_dropped": 4,
                                "dropped_per_class": {"cat": 1, "dog": 1, EVIL: 2}, "decided_by": "val split (influence reference)"},
                    "retrieval": {"pool": str(pool), "pool_images": 9, "pool_classes": 3, "k0": 2, "bank": "gabor",
                                  "rounds_run": 2, "pool_images_used": 6}}}
    conf_val = [[4, 0, 0], [1, 3, 0], [0, 1, 3]]
    conf_test = [[3, 0, 0], [0, 2, 1], [0, 0, 3]]
    metrics = {"val": {"accuracy": 10 / 12, "macro_f1": 0.83, "loss": 0.41, "n": 12, "confusion": conf_val},
               "test": {"accuracy": 8 / 9, "macro_f1": 0.88, "loss": 0.33, "n": 9, "confusion": conf_test}}
    parity = {"n_images": 12, "max_abs_diff": 2.1e-6, "argmax_agree": True, "argmax_mismatches": 0, "passed": True, "atol": 1e-4}
    url = _study(run) if study else f"sqlite:///{(run / 'study.db').resolve()}"
    leaderboard = [{"number": n, "state": s, "value": v, "params": p, "seconds": 1.5, "epochs_run": 2, "baseline": n == 0,
                    "description": f"trial {n}"}
                   for n, s, v, p in [(1, "COMPLETE", 0.9, {"frozen_stages": -1, "lr": 1e-3, "epochs": 4}),
                                      (3, "COMPLETE", 0.85, {"frozen_stages": -1, "lr": 5e-4, "epochs": 3}),
                                      (0, "COMPLETE", 0.8, {"frozen_stages": "all", "lr": 3e-3, "epochs": 15}),
                                      (2, "COMPLETE", 0.7, {"frozen_stages": "all", "lr": 2e-2, "epochs": 8})]]
    search = {"study_name": "autotl", "storage": url, "dashboard": f"optuna-dashboard {url}", "recipe": "quick",
              "objective": "accuracy", "trials_requested": 6, "stopped_by": "trials", "n_trials": 6, "search_seconds": 12.5,
              "candidates": ["tiny_net"], "refit_on_val": False,
              "best": {"number": 1, "value": 0.9, "params": leaderboard[0]["params"], "description": "fine-tune the last 1"},
              "leaderboard": leaderboard}
    card = {"classes": CLASSES, "preprocessing": {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3,
                                                  "std": [0.5] * 3, "crop_pct": 0.875, "crop_mode": "center"},
            "source_model": {"name": "tiny_net", "weights_origin": "random"}, "frozen_stages": 6,
            "metrics": {k: {kk: vv for kk, vv in v.items() if kk != "confusion"} for k, v in metrics.items()},
            "training": training, "data": {k: v for k, v in dataset.items() if k != "skipped"} | {"n_skipped": 2},
            "parity": parity, "autotl_version": "0.1.0", "created": "2026-01-01T00:00:00+00:00",
            "extra": {"decided_by": {"training": "train split", "test": "reported only"}, "search": search}}
    _write_json(run / "model.json", card)
    _write_json(run / "result.json", {"run_dir": str(run), "classes": CLASSES, "source_model": "tiny_net",
                                      "training": training, "metrics": metrics, "parity": parity, "data": dataset,
                                      "seconds": 42.0, "search": search})
    _write_json(run / "data.json", dataset)
    _write_json(run / "leaderboard.json", leaderboard)
    _write_json(run / "history.json", [{"epoch": e, "train_loss": 1.0 / (e + 1), "val_loss": 0.8 - 0.1 * e,
                                        "accuracy": 0.6 + 0.08 * e, "macro_f1": 0.55 + 0.08 * e} for e in range(4)])
    (run / "model.onnx").write_bytes(b"\0" * 2048)
    # scoring: two models, DATL weights for one in datl/*.npz, the other only in scoring.json
    src_names = [f"source class {i}" for i in range(20)] + [EVIL]
    w = np.linspace(0.1, 3.0, len(src_names))
    (run / "datl").mkdir(parents=True, exist_ok=True)
    np.savez_compressed(run / "datl" / "tiny_net.npz", p_t=w / w.sum(), p_s=np.full(w.size, 1 / w.size), w=w,
                        class_names=np.array(src_names), model=np.array("tiny_net"), prior=np.array("uniform"),
                        score=np.array(0.12))
    models = [{"rank": 1, "model": "tiny_net", "weights_origin": "random", "input_size": 64, "params": 1_200_000,
               "scores": {"datl": 0.12, "logme": 1.5, "leep": -0.9, "hscore": 2.1}, "mean_rank": 1.0,
               "datl": {"score": 0.12, "top_mass_10": 0.6, "prior": "uniform", "weights_file": "datl/tiny_net.npz",
                        "top_classes": []}},
              {"rank": 2, "model": "other_net", "weights_origin": "random", "input_size": 64, "params": 3_400_000,
               "scores": {"datl": 0.05, "logme": 1.2, "leep": None, "hscore": 1.8}, "mean_rank": 2.0,
               "datl": {"score": 0.05, "top_mass_10": 0.3, "prior": "uniform",
                        "top_classes": [{"index": 3, "name": "tabby, tabby cat", "w": 4.2, "p_t": 0.004},
                                        {"index": 5, "name": EVIL, "w": 2.0, "p_t": 0.002}]}}]
    _write_json(run / "scoring.json", {"rule": {"name": "logme+leep", "how": "mean rank"}, "note": "scored on train",
                                       "models": models, "ranking": ["tiny_net", "other_net"]})
    # dropout: the most harmful dropped images (one file missing)
    rows = ["rank,path,given_label,predicted_label,influence,influence_spreads,prob_given"]
    dropped = [train[EVIL][0], train["cat"][1], train["dog"][2], data / "train" / "class0" / "gone.png"]
    for k, (p, given, pred) in enumerate(zip(dropped, [EVIL, "cat", "dog", "cat"], ["cat", "cat", EVIL, "dog"]), start=1):
        rows.append(f'{k},"{p}","{given}","{pred}",{0.5 / k:.4f},{5.0 / k:.2f},{0.2 * k:.2f}')
    (run / "dropped.csv").write_text("\n".join(rows) + "\n")
    # retrieval: each target image of two classes with three neighbours from the pool
    rows = ["target_path,target_class,rank,pool_path,pool_class,distance,round"]
    for c in ("cat", EVIL):
        for t in train[c][:2]:
            for r in range(3):
                rows.append(f'"{t}","{c}",{r + 1},"{pool_imgs[3 * (c == EVIL) + r]}",n0{r},{0.1 * (r + 1):.3f},{r // 2}')
    (run / "retrieval.csv").write_text("\n".join(rows) + "\n")
    return run


@pytest.fixture(scope="module")
def _fake_template(tmp_path_factory) -> Path:
    return make_fake_run(tmp_path_factory.mktemp("report") / "run")  # the study takes ~1 s to write: once per module


@pytest.fixture
def fake_run(tmp_path, _fake_template) -> Path:
    """A fresh copy of the fake run (its images and the study the card names stay in the template)."""
    import shutil

    return Path(shutil.copytree(_fake_template, tmp_path / "run"))


def _without_scripts(html: str) -> str:
    return re.sub(r"<script\b[^>]*>.*?</script>", "", html, flags=re.S | re.I)


def _assert_self_contained(html: str) -> None:
    outside = _without_scripts(html)
    assert not re.search(r"""(?:src|href|action|poster|data)\s*=\s*["']?\s*(?:https?:)?//""", outside, re.I), \
        "an external src/href reference"
    assert not re.search(r"<link\b|@import|url\(\s*['\"]?(?:https?:)?//", outside, re.I)
    assert not re.search(r"<script\b[^>]*\bsrc\s*=", html, re.I), "a script loaded from a file or URL"
    assert "Content-Security-Policy" in html and "default-src 'none'" in html


def test_every_section_from_a_full_run(fake_run):
    t0 = time.perf_counter()
    path = write_report(fake_run, plots="svg")
    took = time.perf_counter() - t0
    assert path == fake_run / "report.html" and path.is_file()
    html = path.read_text(encoding="utf-8")
    for anchor in SECTIONS:
        assert f'<section id="{anchor}">' in html, anchor
    assert 'class="omitted"' not in html
    # strategy in words, data, DATL, leaderboard, evaluation, thumbnails, parity
    assert "fine-tune the last 1 of 7 stages of tiny_net (head) + a new head, first 6 frozen" in html
    assert "L2-SP" in html and "data dropout: 4 of 45 training images dropped" in html
    assert "cannot identify image file" in html and "empty file (0 bytes)" in html
    assert "source class 20" not in html and "source class 19" in html  # the top of w(y) from the npz
    assert "tabby, tabby cat" in html  # top classes from scoring.json when there is no npz
    assert "Trial leaderboard" in html and "RuntimeError: out of memory" in html and "pruned" in html
    assert "opened read-only" in html
    assert "Parallel coordinates" in html and "<svg" in html and "Plotly" not in html
    assert "Validation split" in html and "Test split" in html and "precision" in html and "macro average" in html
    assert html.count("data:image/jpeg;base64,") == 3 + 4 * 4  # 3 readable dropped + 4 targets × (1 + 3 neighbours)
    assert "image not found" in html  # the missing dropped file
    assert "passed" in html and "2.10e-06" in html
    _assert_self_contained(html)
    assert took < 10  # ~0.2 s on a quiet machine; generous for shared CI cores


def test_user_strings_are_escaped(fake_run):
    html = write_report(fake_run, plots="svg").read_text(encoding="utf-8")
    assert EVIL not in html and "<script>alert" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html
    assert "&lt;img src=x onerror=alert(2)&gt;.png" in html
    # the only scripts in an SVG-only report: none
    assert "<script" not in html


def test_every_string_in_the_artefacts_is_escaped(fake_run):
    """Wrap every string value of every JSON artefact in markup: none of it may reach the page raw."""
    def evil(obj, key=None):
        if isinstance(obj, dict):
            return {k: evil(v, k) for k, v in obj.items()}
        if isinstance(obj, list):
            return [evil(v, key) for v in obj]
        keep = key in ("storage", "study_name", "root", "path", "state")  # still found, still shown
        return f"<u>{obj}</u>{EVIL}" if isinstance(obj, str) and not keep else obj

    for name in ("model.json", "result.json", "data.json", "scoring.json", "leaderboard.json"):
        _write_json(fake_run / name, evil(json.loads((fake_run / name).read_text())))
    html = write_report(fake_run, plots="svg").read_text(encoding="utf-8")
    assert html.count("&lt;u&gt;") > 30
    assert "<u>" not in html and "<script" not in html
    _assert_self_contained(html)


def test_plotly_figures_inline_plotly_js_once(fake_run):
    pytest.importorskip("plotly")
    html = write_report(fake_run, plots="auto").read_text(encoding="utf-8")
    divs = html.count('class="plotly-graph-div"')
    assert divs >= 3  # history, importance, parallel coordinates (+ intermediate values)
    assert html.count("Plotly.newPlot") == divs
    big = [m for m in re.findall(r"<script[^>]*>(.*?)</script>", html, flags=re.S) if len(m) > 1_000_000]
    assert len(big) == 1, "plotly.js is inlined exactly once"
    assert EVIL not in _without_scripts(html)
    _assert_self_contained(html)


def test_study_is_opened_read_only(fake_run):
    url = json.loads((fake_run / "model.json").read_text())["extra"]["search"]["storage"]
    db = Path(url.removeprefix("sqlite:///"))  # the study the card names
    assert db.is_file()
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    write_report(fake_run, plots="svg")
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before
    assert not db.with_name("study.db-journal").exists() and not db.with_name("study.db-wal").exists()


def test_missing_study_falls_back_to_the_leaderboard(tmp_path):
    run = make_fake_run(tmp_path / "run", study=False)  # the card names a study.db that does not exist
    html = build_html(load_run(run), plots="svg")[0]
    assert not (run / "study.db").exists()  # opening read-only never creates it
    assert "could not open the study" in html and "trials come from leaderboard.json" in html
    assert "Trial leaderboard" in html and "Parallel coordinates" in html


def test_sections_degrade_to_one_line_notes(tmp_path, fake_run):
    run = tmp_path / "bare"
    run.mkdir()
    card = json.loads((fake_run / "model.json").read_text())
    card["extra"] = {}
    _write_json(run / "model.json", card)  # a card only: no result.json, data.json, study, csv files
    html = write_report(run, plots="svg").read_text(encoding="utf-8")
    for anchor in ("scoring", "search", "dropout", "retrieval"):
        assert f'<p class="omitted" id="{anchor}">' in html, anchor
    assert "no confusion matrix recorded" in html  # the card has metrics but not the matrices
    assert '<section id="data">' in html and '<section id="strategy">' in html
    _assert_self_contained(html)

    scored = tmp_path / "scored"  # an `autotl score --out` folder
    scored.mkdir()
    (scored / "scoring.json").write_text((fake_run / "scoring.json").read_text())
    html = write_report(scored).read_text(encoding="utf-8")
    assert '<section id="scoring">' in html
    for anchor in ("strategy", "data", "search", "evaluation", "dropout", "retrieval", "onnx"):
        assert f'id="{anchor}"' in html and f'<section id="{anchor}">' not in html, anchor


def test_a_corrupt_artefact_is_a_note_not_a_crash(fake_run):
    (fake_run / "scoring.json").write_text("{not json")
    (fake_run / "retrieval.csv").write_bytes(b"\xff\xfe\x00garbage")
    html = write_report(fake_run, plots="svg").read_text(encoding="utf-8")
    assert "scoring.json: cannot be read" in html
    assert '<section id="evaluation">' in html and '<section id="search">' in html


def test_bad_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(AutotlError, match=r"nope: no such run folder; give the folder written by `autotl fit`"):
        write_report(tmp_path / "nope")
    f = tmp_path / "model.json"
    f.write_text("{}")
    with pytest.raises(AutotlError, match="is a file, not a run folder"):
        write_report(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AutotlError, match="not an autotl run folder"):
        write_report(empty)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_text("{oops")
    with pytest.raises(AutotlError, match=r"model\.json: cannot be read .*re-run `autotl fit`") as err:
        write_report(broken)
    assert "\n" not in str(err.value)
    with pytest.raises(AutotlError, match="--plots"):
        write_report(tmp_path, plots="png")


def test_report_command(fake_run, tmp_path, capsys):
    try:
        code = main(["report", str(fake_run), "--json", "--plots", "svg", "--out", str(tmp_path / "r.html")])
    finally:
        _console.set_quiet(False)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out) == {"report": str(tmp_path / "r.html")}
    assert (tmp_path / "r.html").is_file()
    code = main(["report", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert code == 2 and "missing: no such run folder" in err


def _leaderboard_scores(html: str) -> dict[int, str]:
    """{trial number: its score cell} in the report's trial leaderboard."""
    board = html[html.index("<h3>Trial leaderboard</h3>"):]
    board = board[:board.index("</table>")]
    return {int(n): cell for n, cell in re.findall(
        r"<tr[^>]*><td class=num>\d+</td><td class=num>(\d+)[^<]*</td><td>[^<]*</td><td class=num>([^<]*)</td>", board)}


def test_leaderboard_shows_mean_and_std_over_folds(fake_run, tmp_path):
    # rows without value_std: plain values, no note on folds
    html = write_report(fake_run, plots="svg").read_text(encoding="utf-8")
    assert _leaderboard_scores(html)[1] == "0.9" and "cross-validation folds" not in html
    # leaderboard.json only: trial 0 cross-validated over 5 folds, trial 1 on a single split
    run = tmp_path / "cv"
    _write_json(run / "leaderboard.json", [
        {"number": 0, "state": "COMPLETE", "value": 0.9, "value_std": 0.0213, "n_folds": 5, "params": {"lr": 1e-3}},
        {"number": 1, "state": "COMPLETE", "value": 0.8, "params": {"lr": 1e-2}}])
    html = write_report(run, plots="svg").read_text(encoding="utf-8")
    assert _leaderboard_scores(html) == {0: "0.9 ± 0.021", 1: "0.8"}
    assert "over 5 cross-validation folds" in html
    # trials read from the study: the std comes from the leaderboard row of the same trial number
    board = json.loads((fake_run / "leaderboard.json").read_text())
    assert board[0]["number"] == 1
    board[0].update(value_std=0.05, n_folds=3)
    _write_json(fake_run / "leaderboard.json", board)
    html = write_report(fake_run, plots="svg").read_text(encoding="utf-8")
    assert "(opened read-only)" in html  # the trials did come from the study
    scores = _leaderboard_scores(html)
    assert scores[1] == "0.9 ± 0.05" and scores[3] == "0.85" and "±" not in scores[0]


def _as_searched_run(run: Path) -> dict:
    """Rewrite the fake run's card and result as a search's: the refit trained on val (the card's
    roles say so), trials cross-validated, a headline estimate."""
    from autotl.estimate import corrected_cv
    from autotl.fit import ROLES

    est = corrected_cv([0.8, 0.9, 0.85], [[0.8, 0.9, 0.85], [0.9, 0.8, 0.8]], 0.05, 40).to_json()
    for name in ("model.json", "result.json"):
        doc = json.loads((run / name).read_text())
        doc["metrics"]["val"]["role"] = ROLES["val_searched"]
        doc["metrics"]["test"]["role"] = ROLES["test"]
        doc["estimate"] = est
        search = (doc.get("extra") or {}).get("search") or doc.get("search")
        search.pop("refit_on_val", None)
        search.update(refit_on="all labelled images (train + val)", refit={"kind": "trained", "epochs": 3, "best_epoch": 2},
                      selection={"kind": "cv", "decided_by": {"trial_ranking": "stratified 3-fold cross-validation over "
                                                                               "all labelled images"}})
        _write_json(run / name, doc)
    return est


def test_report_of_a_search_leads_with_the_estimate_and_names_trained_on_figures(fake_run):
    """A search's refit trained on val: no figure of val is called validation (nor a summary tile),
    the val curves of the final model are left out, the first tile is the estimate."""
    from autotl.estimate import Estimate

    est = _as_searched_run(fake_run)
    html = write_report(fake_run, plots="svg").read_text(encoding="utf-8")
    text = _without_scripts(html)
    assert not re.search(r"(?<!cross-)validation", text, re.I), re.findall(r".{60}(?<!cross-)validation.{60}", text, re.I)
    header = text[text.index('<header class="top">'):text.index("</header>")]
    tiles = re.findall(r'<div class="k">([^<]*)</div>', header)
    assert tiles[0] == "estimate for new images" and not any(t.startswith("val ") for t in tiles)
    assert f"{100 * est['accuracy']:.1f}%" in header
    assert "val split, trained on: the refit after the search trained on val" in text
    assert f"Estimate for new images: {Estimate(**est).line()}" in text
    strategy = text[text.index('<section id="strategy">'):text.index("</section>", text.index('<section id="strategy">'))]
    assert "val loss" not in strategy and "val accuracy" not in strategy and "train loss" in strategy
    assert "early stopping on val" not in strategy and "cross-validated accuracy 0.9" in strategy
    search = text[text.index('<section id="search">'):]
    assert "cross-validated accuracy" in search and "val accuracy" not in search


def test_per_class_metrics():
    out = per_class([[5, 1, 0], [2, 2, 0], [0, 0, 0]])
    assert out[0] == pytest.approx({"precision": 5 / 7, "recall": 5 / 6, "f1": 2 * (5 / 7) * (5 / 6) / (5 / 7 + 5 / 6),
                                    "support": 6})
    assert out[1]["precision"] == pytest.approx(2 / 3) and out[1]["recall"] == pytest.approx(0.5)
    assert out[2] == {"precision": None, "recall": None, "f1": None, "support": 0}


def test_many_classes_confusion_is_a_heat_map(tmp_path):
    k = 40
    names = [f"class {i}" for i in range(k)]
    conf = (np.eye(k, dtype=int) * 5 + (np.arange(k)[:, None] == (np.arange(k)[None, :] + 1) % k)).tolist()
    run = tmp_path / "many"
    _write_json(run / "result.json", {"classes": names, "metrics": {"val": {"accuracy": 0.8, "macro_f1": 0.8, "n": 240,
                                                                          "confusion": conf}}})
    html = write_report(run, plots="svg").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and "most frequent confusions" in html
    assert '<table class="confusion">' not in html


@pytest.mark.slow
def test_report_of_a_real_tiny_fit(tmp_path, make_image_folder):
    from autotl.fit import fit

    data = make_image_folder(tmp_path / "data", classes={"cat": 10, "dog": 10, "fox": 10}, size=(40, 32))
    res = fit(data, tmp_path / "run", models=["test_efficientnet=random"], epochs=2, batch_size=16, search=False)
    t0 = time.perf_counter()
    path = write_report(res.run_dir)
    took = time.perf_counter() - t0
    html = path.read_text(encoding="utf-8")
    # fit ranks its source model(s) first, so the scoring section is there; nothing else was run
    for anchor in ("strategy", "data", "scoring", "evaluation", "onnx"):
        assert f'<section id="{anchor}">' in html, anchor
    for anchor in ("search", "dropout", "retrieval"):
        assert f'<p class="omitted" id="{anchor}">' in html, anchor
    assert "linear probe on frozen test_efficientnet features" in html
    assert html.count("<td") > 10 and "macro average" in html and "passed" in html
    _assert_self_contained(html)
    assert took < 10
