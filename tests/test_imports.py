"""No import cycle inside ``autotl/`` — counting every edge an import can add.

The walk reads the source with ``ast``, so it sees what a run-time check would miss. An edge
``A -> B`` is added for:

- every import statement in ``A``: at module level, inside functions (lazy), and under
  ``if TYPE_CHECKING:`` (a type-only cycle still ties the two modules together, and becomes a
  run-time one as soon as an annotation is evaluated);
- each package whose ``__init__`` that import runs: importing ``autotl.x.y`` from outside
  ``autotl.x`` executes ``autotl/x/__init__.py`` first, so ``A`` also depends on ``autotl.x``
  (a module's own enclosing packages are already initialised when it runs, so they add nothing);
- a package ``__init__`` that re-exports lazily through a module-level ``__getattr__`` reading a
  table of ``"module:name"`` (or sibling-module) strings depends on each module in that table.

A ``Registry``'s ``"module:Class"`` paths are not edges: a ``Base*`` module names its built-in
plug-ins by path precisely so that they can import it (``autotl/_registry.py``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autotl"


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the packages whose ``__init__`` runs before ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _import_targets(tree: ast.AST, package: str, mods: dict[str, Path]):
    """Dotted names every Import/ImportFrom in ``tree`` reaches (TYPE_CHECKING and function bodies included)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from pkg import submodule` depends on the submodule, `from mod import name` on mod
            for a in node.names:
                yield f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target


def _lazy_exports(tree: ast.Module, package: str, mods: dict[str, Path]):
    """Modules named in the tables a module-level ``__getattr__`` reads (``"pkg.mod:name"`` or ``"mod"``)."""
    getattrs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"]
    read = {n.id for f in getattrs for n in ast.walk(f) if isinstance(n, ast.Name)}
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if value is not None else []
        if not (isinstance(value, ast.Dict) and any(isinstance(t, ast.Name) and t.id in read for t in targets)):
            continue
        for v in value.values:
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                module = v.value.partition(":")[0]
                for candidate in (module, f"{package}.{module}"):
                    if candidate in mods:
                        yield candidate
                        break


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = _modules(package)

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        pkg = mod if is_package else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        own = set(_ancestors(mod))
        deps: set[str] = set()
        for target in _import_targets(tree, pkg, mods):
            o = owner(target)
            if o is None:
                continue
            deps.add(o)
            deps |= {p for p in _ancestors(o) if p not in own}
        if is_package:
            deps |= set(_lazy_exports(tree, pkg, mods))
        deps.discard(mod)
        graph[mod] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_graph_sees_lazy_imports():
    graph = import_graph()
    # fit imports the search lazily (inside fit()): the walk must still see that edge
    assert "autotl.search" in graph["autotl.fit"]
    assert "autotl.run" in graph["autotl.search._fit"]


def test_graph_reads_the_lazy_export_tables_of_autotl():
    graph = import_graph()
    # autotl/__init__.py: {"fit": "autotl.fit:fit", ...}; autotl/dropout/__init__.py: {"inspect_dropout": "dryrun", ...}
    assert {"autotl.fit", "autotl.predict", "autotl.score", "autotl.demo"} <= graph["autotl"]
    assert {"autotl.dropout.dryrun", "autotl.dropout.strategy"} <= graph["autotl.dropout"]


def _package(root: Path, files: dict[str, str]) -> Path:
    """A throw-away package tree under ``root``: ``{"pkg/a.py": source, ...}``; returns ``root/pkg``."""
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root / "pkg"


def _lazy_package(target: str) -> dict[str, str]:
    """pkg.sub re-exports ``run`` lazily through ``target`` ("module:name", or a sibling module's
    name); runner needs util, and util imports pkg.sub.leaf, which runs pkg/sub/__init__.py."""
    return {
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": f"""
            from importlib import import_module
            _LAZY = {{"run": {target!r}, "other": "pkg.sub.leaf:other"}}
            def __getattr__(name):
                module, _, attr = _LAZY[name].partition(":")
                return getattr(import_module(module if attr else f"{{__name__}}.{{module}}"), attr or name)
        """,
        "pkg/sub/runner.py": "from ..util import helper\ndef run(): return helper()\n",
        "pkg/sub/leaf.py": "def other(): ...\n",
        "pkg/util.py": "from .sub.leaf import other\ndef helper(): return other()\n",
    }


PLANTED = {
    "TYPE_CHECKING import": ({
        "pkg/__init__.py": "",
        "pkg/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\ndef make() -> 'B': ...\n",
        "pkg/b.py": "from .a import make\nclass B: ...\n",
    }, [["pkg.a", "pkg.b"]]),
    "function-level import": ({
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from .b import g\n    return g()\n",
        "pkg/b.py": "from .a import f\ndef g(): ...\n",
    }, [["pkg.a", "pkg.b"]]),
    # y imports only pkg.sub.z, but that runs pkg/sub/__init__.py, which imports x, which imports y
    "package __init__": ({
        "pkg/__init__.py": "",
        "pkg/sub/__init__.py": "from .x import X\n",
        "pkg/sub/x.py": "from ..y import Y\nX = 1\n",
        "pkg/sub/z.py": "Z = 1\n",
        "pkg/y.py": "from .sub.z import Z\nY = Z\n",
    }, [["pkg.sub", "pkg.sub.x", "pkg.y"]]),
    "lazy re-export by module:name": (_lazy_package("pkg.sub.runner:run"), [["pkg.sub", "pkg.sub.runner", "pkg.util"]]),
    "lazy re-export by sibling module": (_lazy_package("runner"), [["pkg.sub", "pkg.sub.runner", "pkg.util"]]),
    # no cycle: an __init__ runs before its modules, so their imports of each other do not reach back into it
    "package re-exporting its own modules": ({
        "pkg/__init__.py": "from .a import A\nfrom .b import B\n",
        "pkg/a.py": "from .b import B\nA = B\n",
        "pkg/b.py": "from pkg.c import C\nB = C\n",
        "pkg/c.py": "C = 1\n",
    }, []),
}


@pytest.mark.parametrize("files, found", PLANTED.values(), ids=list(PLANTED))
def test_planted_cycles_are_found(tmp_path, files, found):
    assert cycles(import_graph(_package(tmp_path, files))) == found


def test_no_import_cycle_in_autotl():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_nothing_imports_fit():
    """The run flows top-down: autotl.fit calls into the modules, none of them reaches back up."""
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "autotl.fit" in deps and m not in ("autotl", "autotl.cli", "autotl.demo"))
    assert not users, f"modules importing autotl.fit: {users}"


def test_the_flat_names_stay_functions_after_their_modules_are_imported():
    """``fit``, ``predict``, ``demo`` and ``score`` are functions named like their modules: importing
    the module (directly, or as ``demo()`` imports ``fit``) must not turn ``autotl.fit`` into it."""
    code = textwrap.dedent("""
        import sys, autotl
        demo = autotl.demo             # the function, looked up before its module imports autotl.fit
        from autotl.fit import FitResult
        import autotl.predict, autotl.score._compute
        same_name = sorted(n for n, target in autotl._LAZY.items() if target.split(":")[0] == "autotl." + n)
        assert same_name == ["demo", "fit", "predict", "score"], same_name
        for name in same_name:
            value = getattr(autotl, name)
            assert value is getattr(sys.modules["autotl." + name], name), (name, value)
        assert autotl.demo is demo and autotl.FitResult is FitResult
        from autotl import predict
        assert callable(predict) and predict.__module__ == "autotl.predict"
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
