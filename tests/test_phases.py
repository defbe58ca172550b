"""Where a fit's time went: ``Run.phases`` (exclusive seconds per phase) on the card, in
``autotl fit --json``, in result.json and in the report; and a warm-cache rerun does no forward pass."""

from __future__ import annotations

import json
import os

import pytest

from autotl.cli import main
from autotl.run import Phases


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_phases_are_exclusive_accumulate_and_keep_their_order(monkeypatch):
    import autotl.run

    clock = _Clock()
    monkeypatch.setattr(autotl.run.time, "monotonic", clock)
    phases = Phases()
    with phases("scan"):
        clock.now += 2
    with phases("plan"):
        clock.now += 1
        with phases("cost"):  # nested: its 3 s are not also the plan's
            clock.now += 3
        clock.now += 1
    with phases("scan"):  # entered again: accumulates
        clock.now += 0.5
    with pytest.raises(RuntimeError):
        with phases("export"):  # a phase that raises still counts
            clock.now += 4
            raise RuntimeError("boom")
    assert phases.to_json() == {"scan": 2.5, "cost": 3.0, "plan": 2.0, "export": 4.0}
    assert sum(phases.seconds.values()) == pytest.approx(clock.now - 100.0)
    assert phases.line() == "scan 2s, cost 3s, plan 2s, export 4s"


SEARCH_PHASES = ("scan", "model loading", "scoring", "cost", "caches", "search", "refit", "evaluation", "export+parity",
                 "report")


@pytest.mark.slow
def test_a_searched_fit_records_its_phases_on_card_json_and_report(tmp_path, make_image_folder, capsys, monkeypatch):
    """One tiny search through the CLI: every phase is on the card with seconds >= 0 summing to at most
    the wall time, the same numbers in ``--json`` and result.json, a row per phase in the report. A
    second identical fit with the same (now warm) feature cache pushes no batch through a backbone."""
    from autotl.features import FeatureExtractor

    data = make_image_folder(tmp_path / "data", classes={"a": 10, "b": 10}, size=(40, 32))
    computed = []
    real = FeatureExtractor._compute

    def counting(self, samples, key, runner, description, *args):
        computed.append(description)
        return real(self, samples, key, runner, description, *args)

    monkeypatch.setattr(FeatureExtractor, "_compute", counting)
    args = ["fit", str(data), "--model", "test_efficientnet=random", "--recipe", "quick", "--trials", "2",
            "--batch-size", "8", "--cache-dir", str(tmp_path / "cache"), "--json"]
    code = main([*args, "--out", str(tmp_path / "run")])
    out, _ = capsys.readouterr()
    assert code == 0
    assert computed, "a cold cache is filled by forward passes"
    doc = json.loads(out)
    card = json.loads((tmp_path / "run" / "model.json").read_text())
    phases, wall = card["extra"]["phases"], card["extra"]["wall_seconds"]
    assert set(SEARCH_PHASES) <= set(phases), sorted(phases)
    assert "int8" not in phases and "training" not in phases  # neither was run
    assert all(isinstance(s, (int, float)) and s >= 0 for s in phases.values())
    assert sum(phases.values()) <= wall + 0.01 * len(phases)  # (each phase is rounded to 0.01 s)
    assert doc["phases"] == phases and doc["seconds"] == wall
    peaks = card["extra"]["phase_peak_rss_mb"]
    assert set(peaks) == set(phases) and card["extra"]["peak_rss_phase"] in peaks
    assert max(peaks.values()) == peaks[card["extra"]["peak_rss_phase"]] > 0
    assert json.loads((tmp_path / "run" / "result.json").read_text())["phases"] == phases
    html = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "Where the time went" in html
    for name in set(SEARCH_PHASES) - {"report"}:  # the report cannot show its own time
        assert f"</span>{name}</td>" in html, name

    computed.clear()
    code = main([*args, "--out", str(tmp_path / "again")])
    capsys.readouterr()
    assert code == 0
    assert computed == [], f"a warm cache still ran forward passes: {computed}"


def test_report_shows_phases_from_a_card(tmp_path):
    from autotl.report import write_report

    run = tmp_path / "run"
    run.mkdir()
    card = {"classes": ["a", "b"], "preprocessing": {"input_size": [3, 32, 32], "interpolation": "bilinear",
                                                     "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875},
            "extra": {"phases": {"scan": 1.5, "scoring": 30.0, "search": 60.0, "<b>odd</b>": 2.0}, "wall_seconds": 100.0}}
    (run / "model.json").write_text(json.dumps(card))
    html = write_report(run, plots="svg").read_text(encoding="utf-8")
    assert "Where the time went (1 min 40 s in all)" in html
    assert "</span>scoring</td><td class=num>30</td><td class=num>30%</td>" in html
    assert "other (between phases)</td><td class=num>6.5</td>" in html  # 100 - 93.5 s no phase measured
    assert "<b>odd</b>" not in html and "&lt;b&gt;odd&lt;/b&gt;" in html
    (run / "model.json").write_text(json.dumps({**card, "extra": {}}))
    assert "Where the time went" not in write_report(run, plots="svg").read_text(encoding="utf-8")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident size from /proc (Linux)")
def test_phases_name_the_phase_that_set_the_memory_peak():
    """In a fresh process (the high-water mark is per process): the phase that allocates the most is
    named, and the marks never fall; a phase nested in it ends below it and is not the one named."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import json, os
        from autotl.run import Phases
        from autotl._memory import peak_rss_mb
        phases = Phases()
        with phases("small"):
            a = b"\\x01" * (8 << 20)
        with phases("big"):
            with phases("inner"):
                pass
            # past the high-water mark the imports left, by 300 MB (bytes written: calloc'd zero pages would not count)
            rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
            b = b"\\x01" * (int(peak_rss_mb() - rss + 300) << 20)
            del b
        with phases("after"):
            pass
        print(json.dumps({"peak": phases.peak_phase, "mb": phases.peak_mb}))
    """)
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    mb = out["mb"]
    assert out["peak"] == "big"
    assert mb["big"] - mb["inner"] >= 250
    assert mb["small"] <= mb["inner"] <= mb["big"] <= mb["after"]
