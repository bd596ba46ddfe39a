"""`accelerate launch` that keeps the training processes' exit status and adds no launcher traceback.

    python -m dpo.launch --config_file accelerate_configs/single.yaml -m dpo.train --config recipe.yaml

`./launch.sh train` runs this. Accelerate's launcher turns a failed process into its own traceback and exit 1 (a
`CalledProcessError` from one process, a `ChildFailedError` from torch's elastic agent for several), which would
bury dpo.train's one-line error and turn its exit 2 into 1. Here the processes' own output stands alone (a user
error's line, an internal error's traceback) and the launcher exits with the first failing process's status.
SIGTERM, SIGUSR1, SIGUSR2 and SIGHUP reach the training processes (dpo/preemption.py), which save a checkpoint and
exit 75 when their `save_on_signal` names the signal; the launcher then exits 75 too.
"""

from __future__ import annotations

import logging
import subprocess
import sys

from accelerate.commands.launch import launch_command, launch_command_parser

from dpo.preemption import forward_signals_to_workers


def failed_exit_code(exc: BaseException) -> int | None:
    """The status of the failed processes behind a launcher exception; None when it is not one.

    A process that exited by itself (status > 0, e.g. 2 for a user error) speaks for the run: once one fails, the
    elastic agent stops the others with a signal (negative status), and which rank that is depends on timing."""
    if isinstance(exc, subprocess.CalledProcessError):
        return exc.returncode
    failures = getattr(exc, "failures", None)  # torch.distributed.elastic's ChildFailedError
    if isinstance(failures, dict) and failures:
        codes = [getattr(failures[rank], "exitcode", 1) for rank in sorted(failures)]
        own = [code for code in codes if code is not None and code > 0]
        return own[0] if own else next((code for code in codes if code not in (0, None)), 1)
    return None


def main(argv: list[str] | None = None) -> int:
    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # The elastic agent logs each failed process again, with a traceback-like summary; the process said it already.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    forward_signals_to_workers()
    try:
        launch_command(args)
    except Exception as exc:  # noqa: BLE001 - only launcher failures are translated; anything else re-raises
        code = failed_exit_code(exc)
        if code is None:
            raise
        return code if code > 0 else 1  # a process killed by a signal (negative status) still fails
    return 0


if __name__ == "__main__":
    sys.exit(main())
