"""The installable package is the pipeline: setuptools finds dpo and data_prep only, and neither imports the folders
that stay in the clone (demo/, benchmarks/, tests/), which an installed package would not find."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]
CLONE_ONLY = ("demo", "benchmarks", "tests", "builders", "conftest")


def test_setuptools_finds_only_the_pipeline():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = find_packages(str(ROOT), include=include)
    assert {p.split(".")[0] for p in packages} == {"dpo", "data_prep"}
    # the clone-only folders exist and are importable from the repo root, but are not installed
    assert (ROOT / "demo" / "__init__.py").is_file() and (ROOT / "benchmarks" / "__init__.py").is_file()
    assert not any(p.split(".")[0] in CLONE_ONLY for p in packages)


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_package_imports_nothing_that_stays_in_the_clone():
    offenders = {str(path.relative_to(ROOT)): sorted(imported_top_level_names(path) & set(CLONE_ONLY))
                 for package in ("dpo", "data_prep") for path in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in offenders.items() if v}
    # the check sees imports at all: the demo imports the package
    assert {"dpo", "demo"} <= imported_top_level_names(ROOT / "demo" / "run.py")
