"""Re-select on finished suite studies: the current selection rule and ensemble step, no new trials.

    python bench/reselect.py --work WORK [--rows WORK/rows.jsonl] [--name reselect]

For every (task, seed) row that ``bench/suite.py --work WORK --rows ...`` measured, the run folder
``WORK/<task>-s<seed>/run-autotl`` is copied and resumed with ``trials`` = its trial count (so the
study runs nothing new): the winner is selected by the code as it is now, refitted, exported and
scored once on the same held-out folder. This isolates a change of the selection rule from the
search's randomness and wall-clock budget: same trials, other decision. JSON to
``bench/results/NAME.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import print_table, write_results
from suite import held_out_accuracy


def _ms(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.1f} ± {statistics.stdev(xs):.1f}" if len(xs) > 1 else f"{xs[0]:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--rows", type=Path, default=None)
    parser.add_argument("--name", default="reselect")
    args = parser.parse_args()
    from autotl import _console
    from autotl.fit import fit
    from autotl.models import set_torch_threads

    _console.set_quiet(True)
    set_torch_threads()
    rows_file = args.rows or args.work / "rows.jsonl"
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    out = []
    for row in rows:
        root = args.work / f"{row['task']}-s{row['seed']}"
        src = root / "run-autotl"
        board = json.loads((src / "leaderboard.json").read_text())
        dst = root / "run-reselect"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
        t0 = time.monotonic()
        res = fit(root / "data", dst, seed=row["seed"], cache_dir=args.work / "feature-cache", resume=True,
                  trials=len(board))
        ens = res.search.get("ensemble") or {}
        rec = {"task": row["task"], "seed": row["seed"], "before": row["autotl"]["test"],
               "after": held_out_accuracy(res.model_path, root / "test"), "probe": row["probe"]["test"],
               "selected_before": row["autotl"]["selected"], "selected_after": res.search["best"]["description"],
               "ensemble": bool(ens.get("used")), "seconds": time.monotonic() - t0,
               "rule": res.search["selection_rule"]}
        out.append(rec)
        print(f"{rec['task']} s{rec['seed']}: held-out {rec['before']:.3f} -> {rec['after']:.3f} "
              f"(probe {rec['probe']:.3f}); now {rec['selected_after'][:90]}", flush=True)
    table = []
    for task in dict.fromkeys(r["task"] for r in out):
        rs = [r for r in out if r["task"] == task]
        table.append({"task": task, "seeds": len(rs),
                      "probe err %": _ms([100 * (1 - r["probe"]) for r in rs]),
                      "suite rule err %": _ms([100 * (1 - r["before"]) for r in rs]),
                      "current rule err %": _ms([100 * (1 - r["after"]) for r in rs]),
                      "ensembles": f"{sum(r['ensemble'] for r in rs)}/{len(rs)}"})
    print_table("held-out error of the same studies, selected by the suite's rule and by the current one", table,
                ["task", "seeds", "probe err %", "suite rule err %", "current rule err %", "ensembles"])
    write_results(args.name, {"work": str(args.work), "rows": out, "table": table})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
