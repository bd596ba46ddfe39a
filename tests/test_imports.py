"""The package's import structure: every module imports on its own in a fresh interpreter, no module imports
another in a cycle (at any depth, in any function), and imports sit at the top of modules except for optional
dependencies. The graph is read from the source with `ast`, so a cycle hidden in a function body still counts."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dpo", "data_prep")
# Imported inside the functions that need them, on purpose: extras a run may not have installed (wandb, matplotlib,
# trl, bitsandbytes), and DeepSpeed, whose import probes the machine's accelerators and logs about it, so only a run
# launched with DeepSpeed pays for it (dpo/distributed.py is the one place that imports it).
LAZY_ALLOWED = {"wandb": None, "matplotlib": None, "trl": None, "bitsandbytes": None,
                "deepspeed": {"dpo/distributed.py"}}


def package_modules(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages under `root`."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Every dotted name an import statement may bind a module from (`from a import b` may import `a.b`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level or node.module is None:  # relative imports are not used in this project; flag them anyway
        return [f"<relative import at line {node.lineno}>"]
    return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source (module level or inside functions)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets.update(t for t in imported_names(node) if t in modules and t != name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def nested_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import that is not at module level (a module-level `if`/`try` counts as module
    level: it runs at import time)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module_level: set[int] = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        module_level.add(id(node))
        if isinstance(node, (ast.If, ast.Try)):
            stack.extend(node.body + node.orelse + getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in module_level:
            found.extend((node.lineno, name) for name in imported_names(node)[:1])
    return found


def test_no_import_cycles():
    modules = package_modules()
    assert {"dpo.train", "dpo.reference", "data_prep.prepare"} <= set(modules)
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    """The check above can fail: a two-module package whose cycle hides in a function body."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from pkg.a import f\n    return f\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(package_modules(tmp_path, ("pkg",)))
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None
    assert nested_imports(pkg / "b.py") == [(2, "pkg.a")] and nested_imports(pkg / "a.py") == []


def test_imports_sit_at_module_level_except_optional_dependencies():
    offenders = []
    for name, path in package_modules().items():
        rel = path.relative_to(ROOT).as_posix()
        for line, module in nested_imports(path):
            top = module.split(".")[0]
            allowed = top in LAZY_ALLOWED and (LAZY_ALLOWED[top] is None or rel in LAZY_ALLOWED[top])
            if not allowed:
                offenders.append(f"{rel}:{line} imports {module} inside a function")
    assert not offenders, "\n".join(offenders)


IMPORT_EACH = """
import importlib, json, sys, traceback
ours = tuple(sys.argv[1].split(","))
failures = {}
for name in sys.argv[2].split(","):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ours]:
        del sys.modules[loaded]  # each of our modules starts from none of ours imported
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""


def test_every_module_imports_on_its_own_in_a_fresh_interpreter():
    """Each module imported with none of the project's modules loaded before it (third-party ones stay cached
    between modules, which keeps this to one interpreter): an import that only works after another module's
    import, or that breaks at import time, fails here."""
    names = sorted(package_modules())
    out = subprocess.run([sys.executable, "-c", IMPORT_EACH, ",".join(PACKAGES), ",".join(names)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())
