"""What a user meets before and around a run: one line and exit 2 for every ordinary mistake (in dpo.train,
dpo.precompute_ref and through ./launch.sh train), nothing written to an output folder before the inputs are
valid, an earlier run never silently mixed with a new one, a full disk named, and precompute_ref recovering from
a kill between its two renames."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo import atomic
from dpo.errors import run_cli
from dpo.launch import failed_exit_code
from dpo.precompute_ref import main as precompute_main
from dpo.reference import FINGERPRINT_FILE
from dpo.startup import previous_run_outputs, remove_stale_staging
from dpo.train import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("startup_inputs")
    tokenizer = make_tokenizer()
    model = make_model_dir(root / "model", tokenizer, seed=0)
    data = make_data_dir(root / "data", tokenizer, n_train=8, n_eval=4, seed=0)
    run = root / "run"  # an earlier, finished run with a checkpoint
    assert main(["--model_path", str(model), "--data_path", str(data), "--output_dir", str(run), *FAST,
                 "--max_steps", "3", "--save_steps", "2"]) == 0
    return {"model": str(model), "data": str(data), "run": run, "root": root}


def flags(inputs, out: Path, **override: str) -> list[str]:
    values = {"model_path": inputs["model"], "data_path": inputs["data"], "output_dir": str(out), **override}
    return [item for key, value in values.items() for item in (f"--{key}", value)] + list(FAST)


def error_line(capsys, prog: str = "dpo.train") -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, expected", [
    ("missing_model", "model_path: {root}/nope does not exist"),
    ("not_a_model", "holds no config.json"),
    ("missing_data", "data_path: {root}/nope does not exist; run data_prep first"),
    ("batch_too_large", "8 training pairs cannot fill one global batch of 16"),
    ("malformed_yaml", "config: {root}/bad.yaml:2 is not valid YAML"),
    ("nan_learning_rate", "learning_rate: must be a finite number, got nan"),
    ("inf_beta", "beta: must be a finite number, got inf"),
])
def test_user_errors_are_one_line_exit_2_and_touch_nothing(inputs, tmp_path, capsys, case, expected):
    """Each one against an existing run's folder with --overwrite_output_dir: the refusal comes before anything
    there is removed or rewritten."""
    root = inputs["root"]
    out = shutil.copytree(inputs["run"], tmp_path / "run")
    before = snapshot(out)
    override = {"missing_model": {"model_path": f"{root}/nope"}, "not_a_model": {"model_path": inputs["data"]},
                "missing_data": {"data_path": f"{root}/nope"}, "batch_too_large": {"batch_size": "16"},
                "malformed_yaml": {"config": f"{root}/bad.yaml"}, "nan_learning_rate": {"learning_rate": "nan"},
                "inf_beta": {"beta": "inf"}}[case]
    (root / "bad.yaml").write_text("beta: 0.1\n\tlearning_rate: 1e-5\n")  # a tab on line 2
    argv = flags(inputs, out) + [item for k, v in override.items() for item in (f"--{k}", v)]
    assert main([*argv, "--overwrite_output_dir"]) == 2
    assert expected.format(root=root) in error_line(capsys)
    assert snapshot(out) == before


def test_a_fresh_run_into_an_earlier_run_is_refused_unless_overwriting(inputs, tmp_path, capsys):
    out = shutil.copytree(inputs["run"], tmp_path / "run")
    (out / "notes.txt").write_text("mine")
    (out / "data").mkdir()
    before = snapshot(out)
    assert main(flags(inputs, out)) == 2
    line = error_line(capsys)
    assert "already holds a run" in line and "--overwrite_output_dir" in line and "--resume_from_checkpoint" in line
    assert snapshot(out) == before
    assert main([*flags(inputs, out), "--overwrite_output_dir"]) == 0
    assert "removed the earlier run's" in capsys.readouterr().out
    assert not list(out.glob("checkpoint-*")), "the old run's checkpoints must not be picked up by latest"
    assert (out / "notes.txt").read_text() == "mine" and (out / "data").is_dir()  # not ours: kept
    assert (out / "final" / "model.safetensors").is_file()


def test_full_disk_is_named(inputs, tmp_path, capsys):
    """A real full disk: a 300 kB tmpfs (needs root; skipped otherwise)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (not root)")
    try:
        code = main([*flags(inputs, mount / "out"), "--save_steps", "1"])
        line = error_line(capsys)
    finally:
        subprocess.run(["umount", str(mount)], check=True)
    assert code == 2 and "no space left writing" in line and "checkpoint-1" in line


def test_disk_full_and_internal_errors_in_run_cli(capsys):
    """The mapping itself: ENOSPC is a user error naming the file; any other error keeps its traceback."""
    def full() -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")

    assert run_cli("prog", full) == 2
    assert "prog: error: no space left writing /runs/x/metrics.jsonl" in capsys.readouterr().err

    def bug() -> None:
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_cli("prog", bug)


def test_launch_sh_keeps_exit_2_without_a_launcher_traceback(inputs, tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ROOT / "launch.sh"), "train", "--model_path", str(tmp_path / "nope"), "--data_path",
                           inputs["data"], "--output_dir", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CalledProcessError" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("dpo.train:")] == [
        f"dpo.train: error: model_path: {tmp_path / 'nope'} does not exist; models load from local Hugging Face "
        f"folders only"]
    assert not (tmp_path / "out").exists()


def test_precompute_ref_user_errors(inputs, tmp_path, capsys):
    assert precompute_main(["--model_path", str(tmp_path / "nope"), "--data_path", inputs["data"]]) == 2
    assert "model_path:" in error_line(capsys, "dpo.precompute_ref")
    assert precompute_main(["--model_path", inputs["model"], "--data_path", str(tmp_path / "nope")]) == 2
    assert "data_path:" in error_line(capsys, "dpo.precompute_ref")


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_precompute_ref_recovers_from_a_kill_between_its_renames(inputs, tmp_path, capsys):
    """The state a kill leaves (dpo.atomic's names, owned by a process that is gone): train/ moved aside into an
    `.old-` folder, the new split still staged, another staging folder of an earlier kill. Training refuses the
    folder and says what to do; a re-run restores the split, computes it, and removes the leftovers."""
    data = Path(shutil.copytree(inputs["data"], tmp_path / "data"))
    owner = f"{dead_pid()}@{atomic._HOST}"
    moved_aside = data / f".train.old-{owner}-abcd_123"
    moved_aside.mkdir()
    (data / "train").rename(moved_aside / "previous")
    shutil.copytree(moved_aside / "previous", data / f".train.tmp-{owner}-abcd_123")
    (data / f".eval.tmp-{owner}-abcd_123").mkdir()
    assert main(["--model_path", inputs["model"], "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                 *FAST]) == 2
    assert "run dpo.precompute_ref again to restore" in error_line(capsys) and not (tmp_path / "out").exists()
    assert precompute_main(["--model_path", inputs["model"], "--data_path", str(data), "--batch_size", "4"]) == 0
    assert sorted(p.name for p in data.iterdir()) == ["eval", "prep_report.json", "tokenizer", "train"]
    for split in ("train", "eval"):
        assert (data / split / FINGERPRINT_FILE).is_file()
        assert len(datasets.load_from_disk(str(data / split))) == len(datasets.load_from_disk(
            str(Path(inputs["data"]) / split)))


def test_overwriting_and_resuming_together_is_a_config_error():
    from dpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="overwrite_output_dir: cannot be combined with resume_from_checkpoint"):
        load_config(["--overwrite_output_dir", "--resume_from_checkpoint", "latest"])


@pytest.mark.parametrize("codes, expected", [
    ({0: 2, 1: -15}, 2),  # rank 0 failed, the agent stopped rank 1
    ({0: -15, 1: 2}, 2),  # rank 1 failed first, the agent stopped rank 0: the run still exits 2
    ({0: -9, 1: -15}, -9),  # only signals: the first (main() turns it into 1)
    ({0: 3, 1: 2}, 3),
])
def test_the_launch_exit_code_is_the_process_that_failed_by_itself(codes, expected):
    failures = {rank: ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=code, error_file="/nonexistent")
                for rank, code in codes.items()}
    assert failed_exit_code(ChildFailedError("dpo.train", failures)) == expected
    assert failed_exit_code(subprocess.CalledProcessError(2, ["deepspeed"])) == 2
    assert failed_exit_code(ValueError("not a launcher failure")) is None


@pytest.mark.distributed
def test_two_processes_report_a_user_error_once_with_exit_2(inputs, tmp_path):
    """Through dpo.launch (what ./launch.sh train runs) with 2 processes: torch's elastic agent would turn the
    processes' exit 2 into its own traceback and exit 1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "dpo.launch", "--config_file", "accelerate_configs/ddp.yaml",
                           "--num_processes", "2", "--main_process_port", str(port), "-m", "dpo.train",
                           "--model_path", str(tmp_path / "nope"), "--data_path", inputs["data"], "--output_dir",
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ChildFailedError" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("dpo.train: error:")]) == 1


def test_a_run_killed_while_replacing_final_is_undone_and_its_leftovers_count_as_a_run(tmp_path):
    """final/ is replaced through dpo.atomic: a kill between the two renames leaves the previous final/ in an
    owner-named `.old-` folder. The folder then holds a run (a fresh run refuses it), and the resuming run puts
    final/ back and removes every staging folder, the checkpoints' included."""
    out = tmp_path / "run"
    owner = f"{dead_pid()}@{atomic._HOST}"
    previous = out / f".final.old-{owner}-abcd_123" / "previous"
    previous.mkdir(parents=True)
    (previous / "model.safetensors").write_bytes(b"weights")
    (out / f".final.tmp-{owner}-abcd_123").mkdir()
    (out / ".tmp-checkpoint-4").mkdir()
    assert sorted(p.name for p in previous_run_outputs(out)) == sorted(
        [".tmp-checkpoint-4", f".final.old-{owner}-abcd_123", f".final.tmp-{owner}-abcd_123"])
    said: list[str] = []
    remove_stale_staging(out, log=said.append)
    assert snapshot(out) == {"final/model.safetensors": b"weights"}
    assert sorted(p.name for p in out.iterdir()) == ["final"]
    assert said[0] == "[dpo] removed .tmp-checkpoint-4, left by a run killed while saving"
    assert any(line.startswith(f"[dpo] restored {out / 'final'}") for line in said)
