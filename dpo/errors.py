"""User errors and how the command-line entry points report them: one line on stderr and exit status 2.

    sys.exit(run_cli("dpo.train", lambda: train(cfg)))

A `UserError` is a mistake the user can fix (a missing path, a batch larger than the data, a corrupted or
mismatched checkpoint); its message is the whole report. A full disk (ENOSPC, EDQUOT) is reported the same way,
naming the file. `TrainingDiverged` exits 3. Anything else is a bug or an environment failure: it propagates with
its traceback. `RunPreempted` (a run stopped on the scheduler's signal after saving a checkpoint, dpo/preemption.py)
exits 75, EX_TEMPFAIL: requeue and resume.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable

from tqdm import tqdm

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: a job script requeues on it
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UserError(ValueError):
    """A problem with the user's inputs or files; the message says which and what to do."""

    label = "error"


class TrainingDiverged(RuntimeError):
    """A NaN or infinite loss, gradient norm or parameter: the run stops before anything is saved."""


class RunPreempted(Exception):
    """The run stopped on a signal after writing a checkpoint; the message says which and how to resume."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def _say(line: str) -> None:
    # Every process of a launch validates the same inputs and fails the same way: one of them reports it.
    if os.environ.get("RANK", "0") != "0":
        return
    for bar in list(getattr(tqdm, "_instances", ())):  # end an open progress bar's line first
        bar.close()
    print(line, file=sys.stderr)


def run_cli(prog: str, body: Callable[[], object]) -> int:
    """Run `body`; 0 on success, 2 with one line for a user error or a full disk, 3 when training diverged, 75 when
    it stopped on a signal with a checkpoint to resume from."""
    try:
        body()
    except UserError as exc:
        _say(f"{prog}: {exc.label}: {one_line(str(exc))}")
        return EXIT_USER_ERROR
    except TrainingDiverged as exc:
        _say(f"{prog}: {one_line(str(exc))}")
        return EXIT_DIVERGED
    except RunPreempted as exc:
        _say(f"{prog}: {one_line(str(exc))}")
        return EXIT_PREEMPTED
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        where = exc.filename or "the output folder"
        _say(f"{prog}: error: no space left writing {where} ({exc.strerror}); free space or choose another "
             f"output_dir, then resume from the last checkpoint")
        return EXIT_USER_ERROR
    return 0
