"""dpo/atomic.py: atomic file and folder writes, and the clean-up a re-run does after a killed run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo import atomic
from dpo.atomic import is_staging_name, recover, staged_folder, write_text_atomic


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _staging(parent: Path, target: str, kind: str, pid: int, host: str = atomic._HOST) -> Path:
    folder = parent / f".{target}.{kind}-{pid}@{host}-abcd_123"
    folder.mkdir()
    (folder / "shard.arrow").write_bytes(b"x")
    return folder


def _tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in sorted(root.rglob("*"))
    }


def test_write_text_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second, longer")
    assert path.read_text() == "second, longer"
    assert [entry.name for entry in tmp_path.iterdir()] == ["report.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~atomic._umask()


def test_write_text_atomic_failure_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "report.json"
    path.write_text("old")

    def refuse(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(OSError, match="No space"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [entry.name for entry in tmp_path.iterdir()] == ["report.json"]


def test_staging_names_are_recognised() -> None:
    assert is_staging_name(".out.tmp-123@node-1.cluster-abcd_123")
    assert is_staging_name(".my.data.old-7@h-zzzzzzzz")
    assert not is_staging_name("out.tmp-123@node-abcd1234")  # not hidden
    assert not is_staging_name(".out.tmp-abcd1234")  # no owner: not ours to judge
    assert not is_staging_name(".out.tmp-12x@node-abcd1234")
    assert not is_staging_name(".out.backup-1@node-abcd1234")


def test_staged_folder_replaces_the_target_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with staged_folder(target, may_replace=lambda _: None) as staging:
        assert is_staging_name(staging.name) and staging.parent == tmp_path
        (staging / "a").write_text("1")
    assert _tree(tmp_path) == {"out": None, "out/a": b"1"}
    with pytest.raises(RuntimeError):
        with staged_folder(target, may_replace=lambda _: None) as staging:
            (staging / "b").write_text("2")
            raise RuntimeError("killed")
    assert _tree(tmp_path) == {"out": None, "out/a": b"1"}

    def refuse(_: Path) -> None:
        raise ValueError("not yours")

    with pytest.raises(ValueError):
        with staged_folder(target, may_replace=refuse) as staging:
            (staging / "c").write_text("3")
    assert _tree(tmp_path) == {"out": None, "out/a": b"1"}


def test_recover_cleans_only_dead_runs_of_this_target(tmp_path: Path) -> None:
    dead = _dead_pid()
    removed = [_staging(tmp_path, "out", "tmp", dead), _staging(tmp_path, "out", "old", dead)]
    kept = [
        _staging(tmp_path, "out", "tmp", os.getppid()),  # a live process: a run in progress
        _staging(tmp_path, "out", "tmp", dead, host="other-node"),  # another machine's: cannot tell
        _staging(tmp_path, "other", "tmp", dead),  # another target's
    ]
    (tmp_path / ".out.tmp-mine").mkdir()  # the user's, whatever it looks like
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "data").write_text("current")
    actions = recover(tmp_path / "out")
    assert len(actions) == 2 and all("killed run" in action for action in actions)
    assert not any(path.exists() for path in removed)
    assert all(path.is_dir() for path in kept) and (tmp_path / ".out.tmp-mine").is_dir()
    assert (tmp_path / "out" / "data").read_text() == "current"  # the target itself is never touched


def test_recover_undoes_an_interrupted_replacement(tmp_path: Path) -> None:
    dead = _dead_pid()
    old = _staging(tmp_path, "out", "old", dead)
    (old / "previous").mkdir()
    (old / "previous" / "data").write_text("previous output")
    _staging(tmp_path, "out", "tmp", dead)  # the new output, complete or not: redone by the re-run
    actions = recover(tmp_path / "out")
    assert actions[0].startswith(f"restored {tmp_path / 'out'}")
    assert _tree(tmp_path) == {"out": None, "out/data": b"previous output"}


def test_write_file_atomic_takes_any_writer_and_a_failing_one_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    atomic.write_file_atomic(path, lambda temporary: temporary.write_bytes(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"

    def half_then_fail(temporary: Path) -> None:
        temporary.write_bytes(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic.write_file_atomic(path, half_then_fail)
    assert path.read_bytes() == b"\x00\x01" and [entry.name for entry in tmp_path.iterdir()] == ["weights.bin"]


def test_replace_folder_swaps_in_a_folder_staged_under_any_name(tmp_path: Path) -> None:
    """A checkpoint's staging folder has a name every process knows (`.tmp-checkpoint-6`); it replaces an older
    folder of the same step and nothing of either is left beside it."""
    target, staging = tmp_path / "checkpoint-6", tmp_path / ".tmp-checkpoint-6"
    target.mkdir()
    (target / "old").write_text("old")
    staging.mkdir()
    (staging / "new").write_text("new")
    atomic.replace_folder(staging, target)
    assert _tree(tmp_path) == {"checkpoint-6": None, "checkpoint-6/new": b"new"}
    staging.mkdir()
    atomic.replace_folder(staging, tmp_path / "checkpoint-8")  # no previous folder: one rename
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]


def test_interrupted_replacement_is_found_and_recover_all_undoes_it_for_every_target(tmp_path: Path) -> None:
    dead = _dead_pid()
    for name in ("final", "final_merged"):
        old = _staging(tmp_path, name, "old", dead)
        (old / "previous").mkdir()
        (old / "previous" / "model").write_text(name)
    _staging(tmp_path, "final", "tmp", dead)
    assert atomic.interrupted_replacement(tmp_path / "final").name.startswith(".final.old-")
    assert atomic.interrupted_replacement(tmp_path / "checkpoint-2") is None
    assert atomic.staging_target(f".final_merged.old-{dead}@{atomic._HOST}-abcd_123") == "final_merged"
    actions = atomic.recover_all(tmp_path)
    assert sum(action.startswith("restored") for action in actions) == 2
    assert _tree(tmp_path) == {"final": None, "final/model": b"final", "final_merged": None,
                               "final_merged/model": b"final_merged"}
    assert atomic.interrupted_replacement(tmp_path / "final") is None
