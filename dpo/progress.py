"""The training progress bar: live on a terminal, and at most one redraw per `log_interval_s` when stderr is a file
(a cluster or CI log), so a long run's log holds a line every 30 s rather than one per step."""

from __future__ import annotations

import sys
from typing import IO

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(*, total: int, initial: int, enabled: bool, file: IO[str] | None = None,
                 log_interval_s: float = LOG_INTERVAL_S, desc: str = "dpo") -> tqdm:
    """A tqdm bar. Not on a terminal it redraws from `update` only, once `log_interval_s` has passed: a fixed
    `miniters=1` turns off tqdm's adaptive step count, and with it the monitor thread that otherwise forces an extra
    redraw 10 s after each one. Callers pass `refresh=False` to `set_postfix`, which would redraw on every call."""
    stream = file if file is not None else sys.stderr
    if stream.isatty():
        return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=stream,
                    mininterval=0.1)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, file=stream,
                mininterval=log_interval_s, miniters=1)
