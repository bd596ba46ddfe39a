"""The one way outputs are replaced: a file or a whole folder is written beside its target, then renamed into place.

A reader (or a re-run after a kill) sees the target absent, as it was, or complete; never half-written. Used by
data_prep (its output folder and report), training (checkpoints, final/, final_merged/, config.yaml, the synced
reference), and precompute_ref (a split with its reference columns).

- `write_file_atomic(path, write)`: `write(temporary)` fills a temporary sibling, which is `fsync`ed, then
  `os.replace`d over `path`. `write_text_atomic(path, text)` is the text case.
- `staged_folder(target, may_replace=...)`: a context manager yielding a fresh hidden sibling folder to fill; on
  success `replace_folder` puts it in place, on failure it is removed.
- `replace_folder(staging, target)`: a complete folder (filled by several processes, say) becomes `target` in two
  renames (target -> `.NAME.old-.../previous`, staging -> target); the previous target is deleted afterwards.
- `recover(target)`: what a killed run left beside `target` is cleaned up, and an interrupted replacement is
  undone (the previous folder is put back), so that running the same command again is always enough;
  `recover_all(folder)` does it for every target in a folder, `interrupted_replacement(target)` finds a
  replacement killed between its renames.

Staging folders are named `.NAME.tmp-PID@HOST-XXXXXXXX` and `.NAME.old-PID@HOST-XXXXXXXX`: the owner is in the
name from the moment the folder exists, so a folder is only ever cleaned when its process is gone (same host,
PID no longer running). `is_staging_name` recognises them, so inputs can skip them. A folder that several
processes fill (a checkpoint) is staged under a name they all know instead (`.tmp-checkpoint-N`), which only the
run that owns the output folder cleans; its replacement still goes through `replace_folder`.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
# mkdtemp's random part: 8 characters of [a-z0-9_].
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._-]+)-[a-z0-9_]{8}$")


def is_staging_name(name: str) -> bool:
    """Whether `name` is a staging folder of this module (of any target)."""
    return staging_target(name) is not None


def staging_target(name: str) -> str | None:
    """The name of the target a staging folder called `name` stands beside, or None if it is not one."""
    match = _STAGING.match(name)
    return match["name"] if match else None


def _make_sibling(target: Path, kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}@{_HOST}-", dir=target.parent))


def _fsync_path(path: Path) -> None:
    """Flush a file or folder entry to disk (best effort: some file systems refuse it for folders)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)` writes a file at a temporary sibling of `path`, which then replaces `path` whole: `path`
    is either its old content or all of the new one. On failure the temporary file is removed."""
    path = Path(path)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(descriptor)
    temporary = Path(name)
    try:
        write(temporary)
        _fsync_path(temporary)
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; it should look like any new file
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` so that `path` is either its old content or all of `text`."""
    write_file_atomic(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _process_is_gone(pid: int, host: str) -> bool:
    if host != _HOST:
        return False  # another machine's run (shared file system): not ours to judge
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def recover(target: Path) -> list[str]:
    """Clean what killed runs left beside `target`; returns one line per action, for the user to see.

    An `.old-` folder whose owner is gone while `target` is missing means the run was killed between its two
    renames: the previous folder goes back to `target`. Otherwise the `.old-` folder is what was being deleted
    after a successful replacement, and `.tmp-` folders are unfinished outputs: both are removed.
    """
    target = Path(target).absolute()
    parent = target.parent
    if not parent.is_dir():
        return []
    actions: list[str] = []
    leftovers = []
    for entry in sorted(parent.iterdir()):
        match = _STAGING.match(entry.name)
        if match and match["name"] == target.name and entry.is_dir() and not entry.is_symlink():
            if _process_is_gone(int(match["pid"]), match["host"]):
                leftovers.append((match["kind"], entry))
    for kind, entry in leftovers:
        if kind == "old":
            previous = entry / "previous"
            if not os.path.lexists(target) and previous.is_dir():
                os.replace(previous, target)
                actions.append(f"restored {target} from {entry.name} (a run was killed while replacing it)")
    for kind, entry in leftovers:
        shutil.rmtree(entry, ignore_errors=True)
        what = "unfinished output" if kind == "tmp" else "replaced output"
        actions.append(f"removed {entry} ({what} of a killed run)")
    return actions


def interrupted_replacement(target: Path) -> Path | None:
    """The `.old-` folder holding `target`'s previous content while `target` is missing (a replacement killed
    between its two renames, whoever owns it), or None."""
    target = Path(target).absolute()
    if os.path.lexists(target) or not target.parent.is_dir():
        return None
    for entry in sorted(target.parent.iterdir()):
        match = _STAGING.match(entry.name)
        if match and match["name"] == target.name and match["kind"] == "old" and (entry / "previous").is_dir():
            return entry
    return None


def recover_all(folder: Path) -> list[str]:
    """`recover` for every target in `folder` that has staging folders beside it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = sorted({match["name"] for entry in folder.iterdir() if (match := _STAGING.match(entry.name))})
    return [action for name in names for action in recover(folder / name)]


def replace_folder(staging: Path, target: Path) -> None:
    """Make the complete folder `staging` (a sibling of `target`) become `target`.

    Its files are flushed first; an existing `target` is moved into an owner-named `.old-` sibling before
    `staging` takes its name, and deleted only then, so a kill between the two renames leaves the previous
    folder for `recover` to put back."""
    staging, target = Path(staging).absolute(), Path(target).absolute()
    for path in sorted(staging.rglob("*"), reverse=True):  # files before the folders that hold them
        _fsync_path(path)
    old = None
    if target.is_dir():
        old = _make_sibling(target, "old")
        os.replace(target, old / "previous")
    os.replace(staging, target)
    _fsync_path(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_folder(target: Path, *, may_replace: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """A fresh hidden sibling of `target` to fill; it becomes `target` only if the block succeeds.

    `may_replace(target)`, when given, is called just before the renames (the target may have appeared
    meanwhile) and must raise if `target` may not be replaced. On any failure the staging folder is removed and
    `target` is as it was.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _make_sibling(target, "tmp")
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the output should look like any mkdir
    try:
        yield staging
        if may_replace is not None:
            may_replace(target)
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
