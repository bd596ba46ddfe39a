"""Print the exact versions of everything dpo-pipeline[test,bench] installs, as a pip constraints file.

    python .ci/freeze.py > constraints.txt      (from the clone, in the environment the suite just passed in)

The set is the project's requirements (setup.cfg: install_requires and the test and bench extras) and, recursively,
theirs, as installed; not the whole environment, so a package the project does not need never becomes a
constraint. Local version labels are dropped (`torch==2.13.0` matches the CPU build `2.13.0+cpu` and the CUDA one).
"""

from __future__ import annotations

import configparser
import datetime
import importlib.metadata as metadata
import platform
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "bench")
LEFT_OUT = {"setuptools", "wheel", "pip"}  # build tools: pip chooses them for its isolated builds


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[Requirement]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    for extra in EXTRAS:
        lines += cfg["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def installed_closure(roots: list[Requirement]) -> dict[str, str]:
    """name -> installed version, over the requirements' dependencies (markers evaluated here, extras not taken)."""
    environment = default_environment()
    versions: dict[str, str] = {}
    stack = list(roots)
    while stack:
        requirement = stack.pop()
        name = canonical(requirement.name)
        if name in versions or name in LEFT_OUT:
            continue
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"freeze.py: {requirement.name} is required but not installed: install the project first")
        versions[name] = dist.version.split("+")[0]
        for line in dist.requires or []:
            child = Requirement(line)
            if child.marker is None or child.marker.evaluate({**environment, "extra": ""}):
                stack.append(child)
    return versions


def main() -> None:
    versions = installed_closure(project_requirements())
    today = datetime.date.today().isoformat()
    print(f"# Exact versions of dpo-pipeline[test,bench] and its dependencies, frozen {today} (Python "
          f"{platform.python_version()}, {platform.machine()}) from an environment the test suite passed in.")
    print("# Written by `python .ci/freeze.py > constraints.txt`; used by .ci/run and by")
    print("#   pip install -e '.[test]' -c constraints.txt")
    print("# Without it pip installs the newest versions; `.ci/run --latest` tests those (.ci/latest_passed.txt).")
    for name in sorted(versions):
        print(f"{name}=={versions[name]}")


if __name__ == "__main__":
    main()
