"""The command line as one module: only autotl/cli.py imports typer, every command has --help, the
help shows the API's own defaults, and the printed --resume line parses back to the interrupted run."""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import pytest

from autotl.cli import main

AUTOTL = Path(__file__).resolve().parents[1] / "autotl"
COMMANDS = ("fit", "predict", "info", "demo", "score", "report", "dropout", "worker")


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_only_cli_imports_typer():
    importers = set()
    for path in sorted(AUTOTL.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            if any(n == "typer" or n.startswith("typer.") for n in names):
                importers.add(path.relative_to(AUTOTL.parent).as_posix())
    assert importers == {"autotl/cli.py"}


def test_api_modules_load_without_typer():
    code = ("import sys, autotl.score, autotl.report, autotl.worker, autotl.dropout\n"
            "assert 'typer' not in sys.modules, sorted(m for m in sys.modules if m.startswith('typer'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_command_has_help(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and all(c in out for c in COMMANDS)
    for command in COMMANDS:
        code, out, err = run([command, "--help"], capsys)
        assert code == 0 and "Usage" in out, (command, err)


@pytest.mark.parametrize("command, api, options", [
    ("score", "autotl.score:score", {"--rule": "rule", "--top": "top", "--val-fraction": "val_fraction", "--seed": "seed"}),
    ("report", "autotl.report:write_report", {"--plots": "plots"}),
    ("dropout", "autotl.dropout.dryrun:inspect_dropout",
     {"--tau": "tau", "--mode": "mode", "--l2": "l2", "--top": "top", "--model": "model"}),
    ("worker", "autotl.worker:join_study", {"--device": "device"}),
])
def test_help_shows_the_api_defaults(command, api, options, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one option per line, nothing cut
    module, name = api.split(":")
    params = inspect.signature(getattr(import_module(module), name)).parameters
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0
    for flag, param in options.items():
        line = next(line for line in out.splitlines() if re.match(rf"\W*{re.escape(flag)}\s", line))
        assert f"[default: {params[param].default}]" in line, (flag, line)


def test_resume_command_round_trips_and_leaves_out_defaults():
    from typer.main import get_command

    from autotl.cli import _resume_command, app

    fit = get_command(app).commands["fit"]

    def parse(args):
        return fit.make_context("fit", list(args)).params

    given = parse(["data", "--out", "run", "--model", "a", "--model", "b=random", "--trials", "3", "--seed", "2",
                   "--epochs", "15", "--frozen-stages", "-1", "--lr", "0.01", "--source-pool", "my pool"])
    flags = {p.name: o for p in fit.params for o in p.opts if o.startswith("--")}
    options = {flags[k]: v for k, v in given.items() if k not in ("data_dir", "out", "resume", "as_json")}
    argv = shlex.split(_resume_command(Path("run"), Path("data"), options))
    assert argv[:2] == ["autotl", "fit"] and argv[-1] == "--resume"
    assert parse(argv[2:]) == {**given, "resume": True}
    # what the interrupted run had at the fit command's defaults (given or not) is not repeated
    for flag in ("--epochs", "--device", "--batch-size", "--val-fraction", "--dry-run-dropout"):
        assert flag not in argv, flag
