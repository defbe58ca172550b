"""Render run reports in headless Chromium: does ``report.html`` load, lay out and draw its plots offline?

For each RUN_DIR given (default: a synthetic run with every artefact, built like the tests' fake
run), write ``RUN_DIR/report.html`` with ``autotl.report.write_report``, screenshot it with
headless Chromium (``--screenshot``; network and GPU off) to ``bench/results/report.png`` (the
first run) / ``bench/results/report-<run>.png`` (the others), and dump the DOM after the scripts
ran to count the plotly figures that actually rendered. Prints one line per run and writes
``bench/results/render_report.json``.

Needs no install beyond autotl; without a ``chromium`` on PATH it says how to get one and exits 0::

    apt-get install chromium            # Debian / Ubuntu
    python bench/render_report.py /tmp/run_cvd runs/my-search
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium(browser: str, url: str, *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="autotl-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=8000", *extra, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def synthetic_run(folder: Path) -> Path:
    """A run folder with every artefact (the fixture of tests/test_report.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_report import make_fake_run  # noqa: E402 - the tests' fake run, so bench and tests agree

    return make_fake_run(folder)


def render(browser: str, run_dir: Path, png: Path, *, width: int, height: int, plots: str) -> dict:
    from autotl.report import write_report

    t0 = time.perf_counter()
    html_path = write_report(run_dir, plots=plots)
    write_s = time.perf_counter() - t0
    html = html_path.read_text(encoding="utf-8")
    expected = len(re.findall(r'class="plotly-graph-div"', html))
    url = html_path.resolve().as_uri()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    t1 = time.perf_counter()
    shot = chromium(browser, url, f"--screenshot={png}", f"--window-size={width},{height}")
    shot_s = time.perf_counter() - t1
    dom = chromium(browser, url, "--dump-dom")
    rendered = len(re.findall(r"class=\"[^\"]*js-plotly-plot", dom.stdout))  # plotly marks each drawn graph div
    row = {"run": str(run_dir), "html": str(html_path), "html_bytes": html_path.stat().st_size, "write_s": round(write_s, 3),
           "png": str(png), "png_bytes": png.stat().st_size if png.exists() else 0, "screenshot_s": round(shot_s, 2),
           "plotly_figures": expected, "plotly_rendered": rendered, "browser_rc": shot.returncode}
    if png.exists():
        try:
            from PIL import Image

            with Image.open(png) as im:
                row["png_size"] = list(im.size)
        except Exception:  # noqa: BLE001 - the size is informative only
            pass
    else:
        row["browser_stderr"] = shot.stderr[-800:]
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", type=Path, help="run folders (default: a synthetic run with every artefact)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=3000, help="screenshot height in pixels (the page is cut there)")
    ap.add_argument("--plots", default="auto", choices=("auto", "plotly", "svg"))
    args = ap.parse_args(argv)

    browser = find_browser()
    if browser is None:
        print("skipped: no chromium on PATH. Install one to render reports headless, e.g.\n"
              "    apt-get install chromium          # Debian / Ubuntu\n"
              "    brew install --cask chromium      # macOS\n"
              "then run: python bench/render_report.py [RUN_DIR ...]")
        return 0
    with tempfile.TemporaryDirectory(prefix="autotl-report-bench-") as tmp:
        runs = list(args.runs) or [synthetic_run(Path(tmp) / "synthetic-run")]
        rows = []
        for k, run in enumerate(runs):
            png = RESULTS / ("report.png" if k == 0 else f"report-{run.resolve().name}.png")
            row = render(browser, run, png, width=args.width, height=args.height, plots=args.plots)
            rows.append(row)
            size = "x".join(map(str, row.get("png_size", []))) or "?"
            print(f"{run}: report.html {row['html_bytes'] / 1024:.0f} KiB written in {row['write_s']:.2f} s; "
                  f"{png} {row['png_bytes'] / 1024:.0f} KiB ({size} px) in {row['screenshot_s']:.1f} s; "
                  f"plotly figures rendered {row['plotly_rendered']}/{row['plotly_figures']}")
            if not row["png_bytes"]:
                print(f"  chromium wrote no screenshot (rc {row['browser_rc']}): {row.get('browser_stderr', '')}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "render_report.json"
    out.write_text(json.dumps({"bench": "render_report", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "browser": browser,
                               "runs": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["png_bytes"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
