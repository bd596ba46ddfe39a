"""launch.sh: its help, each subcommand's --help, and what it would install on a machine without torch (with
DPO_LAUNCH_DRY_RUN=1 it prints the pip commands instead of running them; the interpreter is a real, empty venv)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "launch.sh", *args], cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=env)


def test_help_prints_only_the_usage():
    done = launch("help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0] == "dpo-pipeline's one entry point."
    assert not any("set -e" in line or line.startswith("#") for line in lines)  # the script body stays out
    for sub in ("demo", "test", "prep", "train", "bench"):
        assert any(line.strip().startswith(f"./launch.sh {sub}") for line in lines), sub
    assert launch("no_such_subcommand").returncode == 2


def test_subcommand_help():
    """`train --help` is launch.sh's own (the flags, without starting accelerate); `test --help` too. The other
    subcommands pass --help to their module's argparse (tests/test_config_help.py)."""
    done = launch("test", "--help")
    assert done.returncode == 0 and "--quick" in done.stdout and "16 minutes" in done.stdout
    # with every dependency importable, nothing is installed (the dry run would say what it would run)
    done = launch("train", "--help", env=dict(os.environ, PYTHON=sys.executable, DPO_LAUNCH_DRY_RUN="1"))
    assert done.returncode == 0, done.stderr
    assert "--accelerate_config FILE" in done.stdout and "--beta (float, default 0.1)" in done.stdout
    assert "would run" not in done.stderr and "installing" not in done.stderr


@pytest.fixture(scope="module")
def empty_python(tmp_path_factory) -> str:
    """A real interpreter with nothing installed (no pip either: the dry run never calls it)."""
    root = tmp_path_factory.mktemp("empty_venv")
    venv.create(root, with_pip=False)
    return str(root / "bin" / "python")


def dry_run_env(python: str, path_dirs: list[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # bash, sed and the coreutils, but never a real nvidia-smi
    env.update(PYTHON=python, DPO_LAUNCH_DRY_RUN="1", PATH=":".join(path_dirs + ["/usr/bin", "/bin"]))
    return env


def test_no_gpu_and_no_torch_installs_the_cpu_build_first(empty_python):
    done = launch("prep", "--help", env=dry_run_env(empty_python, []))
    err = done.stderr
    torch_cmd = (f"would run: {empty_python} -m pip install torch==2.13.0 "
                 f"--index-url https://download.pytorch.org/whl/cpu")
    assert torch_cmd in err
    # the choice and the sizes are explained before the download, and the package follows torch
    assert err.index("no NVIDIA GPU") < err.index(torch_cmd) < err.index(f"{empty_python} -m pip install -e .[test]")
    assert "190 MB" in err[:err.index(torch_cmd)]
    assert " -q" not in err


def test_a_gpu_machine_gets_the_default_cuda_build(empty_python, tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")  # only its presence is looked at
    (fake_bin / "nvidia-smi").chmod(0o755)
    err = launch("prep", "--help", env=dry_run_env(empty_python, [str(fake_bin)])).stderr
    assert f"would run: {empty_python} -m pip install torch==2.13.0\n" in err
    assert "--index-url" not in err and "multi-GB download" in err


def test_readme_install_commands_are_the_ones_launch_sh_runs(empty_python, tmp_path):
    """The README's Install table shows, for a CPU-only and a GPU machine, the torch command launch.sh would run."""
    readme = (ROOT / "README.md").read_text()
    cpu_plan = launch("prep", "--help", env=dry_run_env(empty_python, [])).stderr
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "nvidia-smi").chmod(0o755)
    gpu_plan = launch("prep", "--help", env=dry_run_env(empty_python, [str(fake_bin)])).stderr
    for plan in (cpu_plan, gpu_plan):
        torch_cmd = re.search(rf"would run: {re.escape(empty_python)} -m (pip install torch\S*( .*)?)\n", plan)
        assert torch_cmd and f"`{torch_cmd.group(1)}`" in readme, torch_cmd


@pytest.mark.slow
def test_quick_leaves_out_distributed_and_slow_tests_and_says_how_long():
    """`./launch.sh test --quick` lints, states its duration, then selects with the markers (collected only)."""
    done = launch("test", "--quick", "--collect-only", "-q", "tests/test_distributed.py", "tests/test_launch.py",
                  env=dict(os.environ, PYTHON=sys.executable))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stderr.startswith("[launch.sh] quick tests:") and "3 minutes" in done.stderr
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected and not any("two_processes" in c or "zero3" in c for c in collected)
    assert not any("test_quick_leaves_out" in c for c in collected)  # this test is marked slow
    assert any("test_help_prints_only_the_usage" in c for c in collected)
