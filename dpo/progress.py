"""Training progress: a live tqdm bar on a terminal; in a log file (stderr redirected: clusters, CI), plain lines.

    progress = progress_bar(total=..., initial=..., enabled=is_main_process)   # the loop's progress
    quiet_library_progress()    # transformers' and datasets' own bars off when stderr is not a terminal

A redirected tqdm bar writes every redraw behind a carriage return: the whole run becomes one long line that `less`,
`grep` and log viewers show as garbage. Not on a terminal, progress is instead a newline-terminated line after the
first step (the step time, early), then at most one every `log_interval_s`, and a final one at close.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any, Callable

import datasets
import huggingface_hub.utils
import transformers
from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(*, total: int, initial: int, enabled: bool, file: IO[str] | None = None,
                 log_interval_s: float = LOG_INTERVAL_S, desc: str = "dpo") -> tqdm | LineProgress:
    """A live tqdm bar on a terminal, else `LineProgress`; both take `update`, `set_postfix` and `close`. `desc`
    names the loop (dpo: training steps; eval: evaluation batches)."""
    stream = file if file is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=stream,
                    mininterval=0.1)
    return LineProgress(total=total, initial=initial, enabled=enabled, file=stream, log_interval_s=log_interval_s,
                        desc=desc)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class LineProgress:
    """Progress as log lines: `dpo: step 12/30 (40%) elapsed 0:31 eta 0:46 2.6 s/step loss=0.6931 acc=0.50`.

    A line is written by `update` (after the first step, then once `log_interval_s` has passed since the last
    line) and by `close` (the final state, unless the last line already showed it); `set_postfix` only records what
    the next line shows. `clock` is for tests."""

    def __init__(self, *, total: int, initial: int, enabled: bool, file: IO[str],
                 log_interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic,
                 desc: str = "dpo") -> None:
        self.total, self.n, self.enabled, self.file, self.desc = total, initial, enabled, file, desc
        self.log_interval_s, self.clock = log_interval_s, clock
        self.start_n, self.start = initial, clock()
        self.last_line_at: float | None = None
        self.last_line_n: int | None = None
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:  # refresh: tqdm's signature; never draws
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.last_line_at is None or now - self.last_line_at >= self.log_interval_s:
            self._write(now)

    def close(self) -> None:
        if not self.closed and self.last_line_n != self.n:
            self._write(self.clock())
        self.closed = True

    def _write(self, now: float) -> None:
        self.last_line_at, self.last_line_n = now, self.n
        if not self.enabled:
            return
        elapsed, done = now - self.start, self.n - self.start_n
        parts = [f"{self.desc}: step {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)",
                 f"elapsed {_duration(elapsed)}"]
        if done > 0:
            per_step = elapsed / done
            if self.n < self.total:
                parts.append(f"eta {_duration(per_step * (self.total - self.n))}")
            parts.append(f"{per_step:.3g} s/step")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print(" ".join(parts), file=self.file, flush=True)


def quiet_library_progress(stream: IO[str] | None = None) -> None:
    """Turn off the progress bars transformers (loading and saving weights), datasets (loading shards, map) and the
    Hub draw, when `stream` (stderr) is not a terminal: in a log file each is a carriage-return mess and says nothing
    the run's own lines do not. On a terminal they stay: loading a large model can take minutes."""
    if (stream if stream is not None else sys.stderr).isatty():
        return
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()
