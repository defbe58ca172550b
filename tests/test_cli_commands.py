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
                   "--epochs", "15", "--frozen-stages", "-1", "--lr", "0.01", "--source-pool", "my pool",
                   "--no-ensemble", "--dropout-tau", "2"])
    argv = shlex.split(_resume_command(Path("run"), Path("data"), given))
    assert argv[:2] == ["autotl", "fit"] and argv[-1] == "--resume"
    assert parse(argv[2:]) == {**given, "resume": True}
    # what the interrupted run had at the fit command's defaults (given or not) is not repeated
    for flag in ("--epochs", "--device", "--batch-size", "--val-fraction", "--dry-run-dropout"):
        assert flag not in argv, flag
    assert "--no-ensemble" in argv and "--ensemble" not in argv


def test_every_fit_flag_is_one_option_field_with_its_default():
    """`autotl fit` is made from the option classes: each flag is exactly one field of ``FitOptions`` or
    of a strategy's options, with the field's default (a trial parameter's flag: none, the search varies
    it), every field with a flag has its flag, and ``autotl.fit``'s keywords are ``FitOptions``'s fields."""
    import dataclasses

    from typer.main import get_command

    import autotl
    from autotl.cli import _fit_options, app
    from autotl.options import STRATEGY_OPTIONS, FitOptions, flag_of

    command = get_command(app).commands["fit"]
    cli_only = {"data_dir", "out", "dry_run_dropout", "as_json"}
    classes = (FitOptions, *STRATEGY_OPTIONS)
    for param in command.params:
        if param.name in cli_only:
            continue
        owners = [(cls, f) for cls in classes for f in dataclasses.fields(cls) if f.name == param.name]
        assert len(owners) == 1, param.name
        cls, field = owners[0]
        flag = flag_of(field)
        assert flag is not None and flag.name in param.opts, param.name
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if field.metadata["param"]:
            assert param.default is None, param.name  # not given: the search varies it
        elif flag.value is not dataclasses.MISSING:
            assert param.default is False and default is None, param.name  # --no-search: given or not
        else:
            assert param.default == (list(default) if isinstance(default, tuple) else default), param.name
    flagged = {f.name for cls in classes for f in dataclasses.fields(cls) if flag_of(f)}
    assert flagged == {p.name for p in command.params} - cli_only
    api_only = {f.name for f in dataclasses.fields(FitOptions) if not flag_of(f)}
    assert api_only == {"fixed_params", "options", "config"}  # the strategies' flags fill the first two
    keywords = {n: p.default for n, p in inspect.signature(autotl.fit).parameters.items() if p.kind == p.KEYWORD_ONLY}
    assert keywords == {f.name: getattr(FitOptions(), f.name) for f in dataclasses.fields(FitOptions)}

    # no flag: fit() with its defaults; each strategy flag lands where its class says
    assert FitOptions(**_fit_options(command.make_context("fit", ["data"]).params)) == FitOptions()
    given = command.make_context("fit", ["data", "--dropout-tau", "2", "--focus-class", "cat", "--source-pool", "p",
                                         "--retrieval-k", "3", "--no-search", "--no-ensemble", "--frozen-stages", "-1",
                                         "-m", "a", "-m", "b"]).params
    opts = FitOptions(**_fit_options(given))
    assert opts.fixed_params == {"dropout_tau": "2", "retrieval_k": 3}
    assert opts.options == {"focus_class": "cat", "source_pool": "p"}
    assert opts.search is False and opts.ensemble is False and opts.frozen_stages == -1 and opts.models == ("a", "b")


# where a command's option keeps the API's default (declared None) or names its own (the CLI's choice)
_CLI_OWN_DEFAULT = {("predict", "top_k"): "the console shows 3 labels per image; the API returns 5"}


@pytest.mark.parametrize("command, api", [
    ("score", "autotl.score:score"), ("dropout", "autotl.dropout.dryrun:inspect_dropout"),
    ("report", "autotl.report:write_report"), ("worker", "autotl.worker:join_study"),
    ("predict", "autotl.predict:predict"), ("export", "autotl.quantize:quantize_run"),
])
def test_other_commands_take_the_api_defaults(command, api):
    from typer.main import get_command

    from autotl.cli import app

    module, name = api.split(":")
    params = inspect.signature(getattr(import_module(module), name)).parameters
    shared = [p for p in get_command(app).commands[command].params if p.name in params and not p.required]
    assert shared, command
    for p in shared:
        api_default = params[p.name].default
        if (command, p.name) in _CLI_OWN_DEFAULT:
            assert p.default != api_default
        else:  # None: not given, the API's own default applies (and the help shows it)
            assert p.default is None or p.default == api_default, (command, p.name, p.default, api_default)
