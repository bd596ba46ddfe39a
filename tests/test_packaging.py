"""The installable package is the pipeline: setuptools finds dpo and data_prep only, and neither imports the folders
that stay in the clone (demo/, benchmarks/, tests/), which an installed package would not find."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
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


def test_the_constraints_pin_every_requirement_within_its_range():
    """constraints.txt (what CI installs) pins each requirement of setup.cfg and its test and bench extras to one
    version that the range there allows, and the TRL series the cross-checks are written against: a requirement
    added to setup.cfg without a pin, or a pin outside its range, fails here rather than in a fresh install."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    lines += cfg["options.extras_require"]["test"].splitlines() + cfg["options.extras_require"]["bench"].splitlines()
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for requirement in (Requirement(line) for line in lines if line.strip()):
        name = canonicalize_name(requirement.name)
        assert name in pins, f"constraints.txt pins no version of {requirement.name}"
        assert requirement.specifier.contains(pins[name]), (requirement, pins[name])
    assert pins["trl"].startswith("1.16.") and pins["torch"] == "2.13.0"  # what .ci/run installs besides
