"""Save on the scheduler's signal: a preempted run stops at a step boundary with a checkpoint and exit status 75.

    stop = PreemptionSignals(cfg.save_on_signal)      # installs the handlers (main thread, every process)
    ...after each optimizer step, on every process:
    if stop.agreed(accelerator):                       # one all-reduce: did any process get a signal?
        save checkpoint-STEP
        raise stop.preempted(step=STEP, total_steps=N, output_dir=OUT)     # dpo.errors.run_cli: exit 75

Cluster schedulers warn before they stop a job: SLURM sends `--signal=B:USR1@SECONDS` ahead of the time limit and
SIGTERM on preemption (SIGKILL follows after its grace time), Kubernetes sends SIGTERM. The handler only records
the signal, so the optimizer step in flight finishes normally. A signal may reach only some processes (a launcher
that forwards it to its own node, a `kill` of one PID): at each step boundary the processes reduce their flags
(max), so all of them stop after the same step and write one checkpoint together. Further signals while stopping
only set the flag again; a SIGKILL in the middle of the write leaves the staging folder `.tmp-checkpoint-N`, never
read, so the previous checkpoint stays the newest valid one (dpo/checkpoint.py, dpo/atomic.py).

Exit status 75 (`EX_TEMPFAIL` of sysexits.h, "try again later") tells a job script to requeue the job and resume
with `--resume_from_checkpoint latest` (examples/slurm_multi_node.sbatch does).
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import psutil  # an Accelerate dependency
import torch

from dpo.errors import RunPreempted

__all__ = ["DEFAULT_SIGNALS", "PreemptionSignals", "RunPreempted", "forward_signals_to_workers", "parse_signals"]

DEFAULT_SIGNALS = "SIGTERM,SIGUSR1"
# Signals a run may save on: the ones schedulers send ahead of a stop (SIGINT is Ctrl-C, also accepted).
ALLOWED = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


def parse_signals(value: str | list[str] | None) -> list[signal.Signals]:
    """`save_on_signal` as signals: a comma string or a list of names (`USR1` or `SIGUSR1`, any case);
    `none` (or an empty list) disables saving on a signal. Raises ValueError naming a name that is not allowed."""
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip().upper() for n in names if str(n).strip()]
    if names in ([], ["NONE"]):
        return []
    found = []
    for name in names:
        full = name if name.startswith("SIG") else f"SIG{name}"
        if full not in ALLOWED:
            raise ValueError(f"save_on_signal: {name!r} is not one of {', '.join(ALLOWED)} (or none)")
        sig = signal.Signals[full]
        if sig not in found:
            found.append(sig)
    return found


def forward_signals_to_workers() -> None:
    """For a launcher (dpo.launch): pass every signal a run may save on, except Ctrl-C's SIGINT, to the training
    processes it starts, and keep waiting for them.

    Without this, SIGUSR1 would kill the launcher (its default action) and orphan the workers, and torch's elastic
    agent would answer SIGTERM by stopping the workers itself and killing them 30 s later, whether or not their
    checkpoint is written. The agent is told to leave those signals alone (TORCHELASTIC_SIGNALS_TO_HANDLE, unless
    the user set it); the workers then decide, by their own `save_on_signal`, what a signal means."""
    forwarded = [signal.Signals[name] for name in ALLOWED if name != "SIGINT"]
    os.environ.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGINT,SIGQUIT")

    def forward(signum: int, frame: FrameType | None) -> None:
        for child in psutil.Process().children():
            try:
                if "multiprocessing" in " ".join(child.cmdline()):  # a resource tracker, not a worker
                    continue
                child.send_signal(signum)
            except psutil.Error:
                pass  # it exited meanwhile

    for sig in forwarded:
        signal.signal(sig, forward)


class PreemptionSignals:
    """Records the configured signals; `agreed` says, identically on every process, whether the run must stop."""

    def __init__(self, value: str | list[str] | None) -> None:
        self.signals = parse_signals(value)
        self.received: list[str] = []  # names, in arrival order (appended by the handler)
        self._previous: dict[signal.Signals, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; a run in a thread keeps the defaults
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        # Only a list append: safe at any point of the interrupted code (printing here could re-enter stdout).
        self.received.append(signal.Signals(signum).name)

    def agreed(self, accelerator: Any) -> bool:
        """True on every process when any process has received a signal (a max-reduce of the flag)."""
        if not self.signals:
            return False
        flag = torch.tensor([1.0 if self.received else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def describe(self) -> str:
        """The signal(s) this process saw, for the log: 'SIGUSR1' or 'another process's signal'."""
        if not self.received:
            return "another process's signal"
        return "+".join(dict.fromkeys(self.received))

    def preempted(self, *, step: int, total_steps: int, output_dir: Path) -> RunPreempted:
        """The exception that ends the run once checkpoint-`step` is written (handlers restored first)."""
        self.restore()
        return RunPreempted(f"stopped by {self.describe()} at step {step} of {total_steps}; checkpoint-{step} saved in "
                            f"{output_dir}; resume with --resume_from_checkpoint latest (any number of processes)")

    def restore(self) -> None:
        """Put the previous handlers back (a run called in-process, e.g. by tests, leaves none behind)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
