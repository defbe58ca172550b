"""The built wheel is a working autotl: it ships the recipes, installs into a fresh venv, and a short
search runs from that venv's ``autotl`` executable, outside the checkout."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for p in (ROOT / "recipes").iterdir() if p.suffix in (".yaml", ".yml"))
# What never belongs in a build: VCS data, earlier build output, caches, run folders.
_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                     ".benchmarks", "runs", ".venv", ".whl", ".gl", "*.onnx", "*.pt", "*.pth", "*.npz")


class StepLog:
    """What the test ran: one summary line per step (always printed) and every command's full
    output (in the failure message)."""

    def __init__(self) -> None:
        self.summary: list[str] = []
        self.output: list[str] = []

    def note(self, line: str) -> None:
        self.summary.append(line)
        self.output.append(line)

    def run(self, cmd: list, *, timeout: float, log_stdout: bool = True, **kw) -> subprocess.CompletedProcess:
        start = time.perf_counter()
        try:
            proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
        except subprocess.TimeoutExpired as exc:
            self.note(f"$ {' '.join(str(c) for c in cmd)}  -> killed after {timeout:.0f}s")
            self.output.extend(str(exc.stdout or "").splitlines() + str(exc.stderr or "").splitlines())
            raise AssertionError(self.failure(f"timed out: {cmd[0]}")) from None
        self.note(f"$ {' '.join(str(c) for c in cmd)}  -> exit {proc.returncode} in {time.perf_counter() - start:.1f}s")
        text = (proc.stdout if log_stdout else "") + proc.stderr
        self.output.extend(line for line in text.splitlines() if line.strip())
        return proc

    def failure(self, what: str) -> str:
        return f"{what}\n" + "\n".join(self.output[-300:])


def _clean_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INPUT="1", PIP_DISABLE_PIP_VERSION_CHECK="1",
               AUTOTL_CACHE_DIR=str(tmp / "autotl-cache"))
    return env


def _build_prerequisites_missing() -> str | None:
    """Why ``pip wheel --no-build-isolation`` + venv cannot work in this interpreter, or None."""
    for module in ("pip", "venv", "setuptools"):
        if importlib.util.find_spec(module) is None:
            return f"cannot build and install a wheel here: the {module!r} module is not installed"
    setuptools_version = tuple(int(p) for p in re.findall(r"\d+", importlib.metadata.version("setuptools"))[:2])
    if setuptools_version < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "cannot build a wheel without isolation here: setuptools < 70.1 needs the 'wheel' package"
    return None


def installing_site_dirs() -> list[str]:
    """The site-packages folders of the interpreter running the tests, whatever made it: the system
    Python, or a virtualenv (its own site-packages, plus the base's when it was made with
    --system-site-packages). ``venv --system-site-packages`` from a venv would see only the base's."""
    import site

    found = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    found += site.getsitepackages()
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return [p for p in dict.fromkeys(os.path.abspath(p) for p in found) if os.path.isdir(p)]


def see_installing_environment(python: Path, log: "StepLog", env: dict[str, str], dirs: list[str] | None = None) -> None:
    """Make the venv of ``python`` see the installing environment's packages (``dirs``, default
    ``installing_site_dirs()``), after its own: a .pth file in its site-packages adds those folders
    as site folders (their own .pth files run too)."""
    proc = log.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60, env=env)
    assert proc.returncode == 0, log.failure("cannot ask the venv for its site-packages")
    purelib = Path(proc.stdout.strip().splitlines()[-1])
    dirs = installing_site_dirs() if dirs is None else dirs
    (purelib / "_autotl_installing_env.pth").write_text(
        f"import site; list(map(site.addsitedir, {dirs!r}))\n", encoding="utf-8")
    log.note(f"venv {purelib} sees {', '.join(dirs)}")


def test_venv_sees_the_installing_environments_packages(tmp_path):
    """What the wheel test relies on, fast: a package only the running environment has (here a
    stand-in in a site folder of its own) is importable in the venv, and the venv's own packages
    come first."""
    import site

    if importlib.util.find_spec("venv") is None:
        pytest.skip("no venv module")
    log = StepLog()
    env = _clean_env(tmp_path)
    outer = tmp_path / "outer-site-packages"  # as a virtualenv's site-packages would be
    (outer / "only_outside").mkdir(parents=True)
    (outer / "only_outside" / "__init__.py").write_text("WHERE = 'outside'\n")
    (outer / "shadowed").mkdir()
    (outer / "shadowed" / "__init__.py").write_text("WHERE = 'outside'\n")
    venv = tmp_path / "venv"
    proc = log.run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120, env=env)
    if proc.returncode != 0:
        pytest.skip("cannot create a virtual environment here")
    python = venv / ("Scripts" if os.name == "nt" else "bin") / ("python.exe" if os.name == "nt" else "python")
    see_installing_environment(python, log, env, [str(outer), *installing_site_dirs()])
    purelib = next(venv.rglob("_autotl_installing_env.pth")).parent
    (purelib / "shadowed").mkdir()
    (purelib / "shadowed" / "__init__.py").write_text("WHERE = 'venv'\n")
    proc = log.run([python, "-c", "import only_outside, shadowed, rich; print(only_outside.WHERE, shadowed.WHERE)"],
                   timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, log.failure("the venv does not see the installing environment")
    assert proc.stdout.split() == ["outside", "venv"]
    assert site.getsitepackages()  # (the running interpreter has site folders at all)


def test_checkout_reads_the_top_level_recipes():
    import autotl
    from autotl._recipe import list_recipes, recipe_dirs

    if Path(autotl.__file__).resolve().parent != ROOT / "autotl":
        pytest.skip(f"autotl is imported from {autotl.__file__}, not from this checkout")
    assert recipe_dirs()[0] == ROOT / "recipes"
    assert list_recipes() == {r.stem: r for r in RECIPES}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_wheel_ships_recipes_installs_into_fresh_venv_and_searches(tmp_path):
    missing = _build_prerequisites_missing()
    if missing:
        pytest.skip(missing)
    assert RECIPES, f"no recipes in {ROOT / 'recipes'}"
    log = StepLog()
    env = _clean_env(tmp_path)
    t0 = time.perf_counter()
    try:
        # Build from a copy: setuptools writes build/ and *.egg-info into the source tree, and a
        # stale build/ in the checkout could leak old files into the wheel. The wheel is built from
        # the sdist, as `python -m build` and pip (for an sdist from an index) do: MANIFEST.in counts.
        src = tmp_path / "src"
        shutil.copytree(ROOT, src, ignore=_NOT_SOURCE)
        sdist_dir = tmp_path / "sdist"
        proc = log.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                        "print(build_meta.build_sdist(sys.argv[1]))", sdist_dir], timeout=300, cwd=src, env=env)
        assert proc.returncode == 0, log.failure("building the sdist failed")
        (sdist,) = sdist_dir.glob("autotl-*.tar.gz")
        with tarfile.open(sdist) as tar:
            # the "data" filter (refuses links out of the tree) exists from Python 3.10.12 / 3.11.4
            tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        (unpacked,) = (tmp_path / "unpacked").iterdir()

        wheel_dir = tmp_path / "wheels"
        proc = log.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", wheel_dir, "."], timeout=300, cwd=unpacked, env=env)
        assert proc.returncode == 0, log.failure("pip wheel failed")
        (wheel,) = wheel_dir.glob("autotl-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            for recipe in RECIPES:
                member = f"autotl/recipes/{recipe.name}"
                assert member in names, log.failure(f"{wheel.name} lacks {member}")
                assert zf.read(member) == recipe.read_bytes(), f"{member} differs from {recipe}"
        log.note(f"{wheel.name}: ships {', '.join(f'autotl/recipes/{r.name}' for r in RECIPES)}")

        # A fresh venv that sees this environment's torch/timm/onnx (no downloads) but gets autotl
        # only from the wheel; pip comes from this environment too, so the venv needs none.
        venv = tmp_path / "venv"
        proc = log.run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120, env=env)
        if proc.returncode != 0:
            pytest.skip("cannot create a virtual environment here: " + (proc.stderr.strip().splitlines() or ["?"])[-1])
        bindir = venv / ("Scripts" if os.name == "nt" else "bin")
        python = bindir / ("python.exe" if os.name == "nt" else "python")
        see_installing_environment(python, log, env)
        # --ignore-installed: the checkout's editable autotl is visible through the system
        # site-packages, and pip would otherwise call the wheel "already installed".
        proc = log.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel],
                       timeout=300, env=env)
        assert proc.returncode == 0, log.failure("installing the wheel into the venv failed")

        outside = tmp_path / "elsewhere"  # not the checkout: nothing may come from the working tree
        outside.mkdir()
        probe = ("import json, autotl; from autotl._recipe import recipe_dirs, list_recipes; "
                 "print(json.dumps({'file': autotl.__file__, 'dirs': [str(d) for d in recipe_dirs()], "
                 "'recipes': {k: str(v) for k, v in list_recipes().items()}}))")
        proc = log.run([python, "-c", probe], timeout=120, cwd=outside, env=env)
        assert proc.returncode == 0, log.failure("importing autotl from the venv failed")
        where = json.loads(proc.stdout.strip().splitlines()[-1])
        venv_root = venv.resolve()
        package = Path(where["file"]).resolve().parent
        assert package.is_relative_to(venv_root), log.failure(f"imported {where['file']}, not the venv's autotl")
        assert [Path(d).resolve() for d in where["dirs"]] == [package / "recipes"], where
        assert set(where["recipes"]) == {r.stem for r in RECIPES}, where

        data = write_image_folder(tmp_path / "images", {"cat": 8, "dog": 8}, splits=["train", "val"], size=(40, 32))
        run_dir = outside / "run"
        proc = log.run([bindir / "autotl", "fit", data, "--out", run_dir, "--model", "test_efficientnet=random",
                        "--recipe", "quick", "--trials", "2", "--batch-size", "8", "--device", "cpu",
                        "--cache-dir", tmp_path / "features", "--json"],
                       timeout=420, cwd=outside, env=env, log_stdout=False)  # stdout: the JSON checked below
        assert proc.returncode == 0, log.failure("autotl fit from the venv failed")
        result = json.loads(proc.stdout)
        search = result["search"]
        assert search["recipe"] == "quick" and search["n_trials"] == 2, search
        assert Path(search["recipe_source"]).resolve() == package / "recipes" / "quick.yaml", search["recipe_source"]
        assert (run_dir / "model.onnx").is_file() and (run_dir / "model.json").is_file()
        assert result["parity"]["passed"]
        log.note(f"search from {bindir / 'autotl'}: {search['n_trials']} trials of recipe "
                 f"{search['recipe_source']}, wrote {run_dir / 'model.onnx'} "
                 f"({(run_dir / 'model.onnx').stat().st_size} bytes); total {time.perf_counter() - t0:.1f}s")
    finally:
        print("\n".join(log.summary))
