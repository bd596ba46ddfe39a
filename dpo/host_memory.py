"""Host memory that tensors free goes back to the operating system (glibc's malloc), so peak RSS follows live tensors.

    return_freed_memory()   # once, before the models load; returns the threshold set, or None where it does nothing

PyTorch's CPU tensors come from malloc. glibc serves a request below its mmap threshold from the heap, and its
threshold rises on its own, up to 32 MiB, as large blocks are freed - so after the first step nearly every
activation (a few to a few tens of MB at real sizes) lives in the heap, where memory freed between two live blocks
stays resident. A fixed threshold (which also stops glibc raising it) makes every block of 1 MiB or more its own
mapping, returned on free.

The trade (measured 2026-12-04, README "Host memory against speed"): on the memory benchmark's Qwen2-shaped model
(vocabulary 151,936, four 1k-token pairs, full fine-tune) peak RSS 2,648-2,654 MB at 1 MiB (0.40x TRL's) against
3,132-3,318 MB with glibc's own threshold; on the throughput benchmark's long multi-turn prompts the fresh mappings
cost ~1.8M page faults per step (~2 us each, faulting and zeroing) against almost none, a fifth to a quarter of the
useful tokens per CPU-second. Nothing measured kept both (benchmarks/malloc_variants.py has each one): glibc's own
threshold with `malloc_trim(0)` after the policy's forward and before the optimizer step (2,842 MB, 0.43x), also at
each decoder layer's backward or the forward's start (2,795 MB), the 1 MiB threshold only from the policy's forward,
only in the backward, or only around the LM head (2,796-2,830 MB: glibc serves a request from free heap chunks
before it looks at the threshold, so the backward refaults what was trimmed), one malloc arena (3,219 MB), a 64 MiB
trim threshold and top pad (2,663 MB, 0.401x, 7% fewer faults), fixed thresholds of 4 or 16 MiB, transparent huge
pages, jemalloc preloaded (its defaults: the 1 MiB threshold's speed; never purging: 0.43x). The default keeps
the memory; `MALLOC_MMAP_THRESHOLD_=268435456` in the environment chooses the speed.

A threshold the user set (`MALLOC_MMAP_THRESHOLD_` in the environment) is kept, and so is every allocator that is
not glibc's (musl, macOS, jemalloc/tcmalloc preloaded: `mallopt` is then absent or ignored).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 20


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
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return threshold_bytes if mallopt(M_MMAP_THRESHOLD, threshold_bytes) == 1 else None
