"""Host memory that tensors free goes back to the operating system (glibc's malloc), so peak RSS follows live tensors.

    return_freed_memory()   # once, before the models load; returns the threshold set, or None where it does nothing

PyTorch's CPU tensors come from malloc. glibc serves a request below its mmap threshold from the heap, and its
threshold rises on its own, up to 32 MiB, as large blocks are freed - so after the first step nearly every
activation (a few to a few tens of MB at real sizes) lives in the heap, where memory freed between two live blocks
stays resident. Measured on the memory benchmark's Qwen2-shaped model (vocabulary 151,936, four 1k-token pairs, full
fine-tune, two steps): peak RSS 3,168 MB against 1,666 MB of live malloc bytes plus the 624 MB of mmapped weights and
the libraries, i.e. ~440 MB held by the heap for nothing; with a fixed 1 MiB threshold, 2,727 MB. A fixed threshold
(which also stops glibc raising it) makes every block of 1 MiB or more its own mapping, returned on free. The cost is
page faults on fresh mappings, a small share of a step whose large tensors (the LM head's chunks, gradients) are
mappings anyway.

A threshold the user set (`MALLOC_MMAP_THRESHOLD_` in the environment) is kept, and so is every allocator that is
not glibc's (musl, macOS, jemalloc/tcmalloc preloaded: `mallopt` is then absent or ignored).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 20
_STEP_TRIM = False
_FWD_TRIM = [False]


def after_forward() -> None:
    """EXPERIMENT: malloc_trim after a forward, before the next big allocations."""
    if _FWD_TRIM[0]:
        ctypes.CDLL(None).malloc_trim(0)


def _size(text: str) -> int:
    return int(float(text[:-1]) * (1 << 20)) if text.endswith("m") else int(text)


def _experiment(libc) -> int | None:  # EXPERIMENT (issue 22): DPO_HOST_MEMORY=mmap=1m,trim_threshold=..,arena=..,step_trim
    global _STEP_TRIM
    spec = os.environ.get("DPO_HOST_MEMORY", "mmap=1m")
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key == "mmap":
            libc.mallopt(M_MMAP_THRESHOLD, _size(value))
        elif key == "trim_threshold":
            libc.mallopt(M_TRIM_THRESHOLD, _size(value))
        elif key == "arena":
            libc.mallopt(M_ARENA_MAX, int(value))
        elif key == "step_trim":
            _STEP_TRIM = True
        elif key == "thp":
            os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        elif key == "fwd_trim":
            _STEP_TRIM = _FWD_TRIM[0] = True
        elif key != "off":
            raise ValueError(spec)
    print(f"[host_memory] {spec}", file=sys.stderr)
    return 1


def between_steps() -> None:
    """EXPERIMENT: malloc_trim at a step boundary."""
    if _STEP_TRIM:
        ctypes.CDLL(None).malloc_trim(0)


def return_freed_memory(threshold_bytes: int = THRESHOLD_BYTES) -> int | None:
    """Fix glibc's mmap threshold at `threshold_bytes`; the threshold set, or None when nothing was changed."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return None
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has mallopt as a no-op)
    except (OSError, AttributeError):
        return None
    return _experiment(libc)
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return threshold_bytes if mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1 else None
