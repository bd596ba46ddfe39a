"""Host memory that tensors free goes back to the operating system (glibc's malloc), so peak RSS follows live tensors,
without paying a page fault per 4 KiB for it.

    request_huge_pages()    # when the `dpo` package is imported, before PyTorch's first CPU allocation
    return_freed_memory()   # once, before the models load; returns the threshold set, or None where it does nothing

PyTorch's CPU tensors come from malloc. glibc serves a request below its mmap threshold from the heap, and its
threshold rises on its own, up to 32 MiB, as large blocks are freed - so after the first step nearly every
activation (a few to a few tens of MB at real sizes) lives in the heap, where memory freed between two live blocks
stays resident. Measured on the memory benchmark's Qwen2-shaped model (vocabulary 151,936, four 1k-token pairs, full
fine-tune, two steps): peak RSS 3,132 MB with glibc's own threshold, 2,654 MB with a fixed 1 MiB threshold (which
also stops glibc raising it): every block of 1 MiB or more is its own mapping, returned on free. Trimming the heap
(`malloc_trim`) at step boundaries or after each forward did not help (3,164 and 3,126 MB): the memory is held
inside the step, between live blocks.

The price of a fresh mapping is a page fault per 4 KiB page touched: ~20% of the throughput benchmark's step on long
prompts (issue 22), more in system time. PyTorch's allocator can ask the kernel for transparent huge pages on blocks
of 2 MiB or more (`THP_MEM_ALLOC_ENABLE=1`, madvise), one fault per 2 MiB: that took the cost back with the same
peak (README, Benchmarks). PyTorch reads that variable once, at its first CPU allocation, so it is set when this
package is imported, before anything allocates; where the kernel's THP mode is `never` it does nothing.

A setting the user made is kept: `MALLOC_MMAP_THRESHOLD_` or `THP_MEM_ALLOC_ENABLE` in the environment, and every
allocator that is not glibc's (musl, macOS, jemalloc/tcmalloc preloaded: `mallopt` is then absent or ignored).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>
THRESHOLD_BYTES = 1 << 20
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"  # read by PyTorch's CPU allocator (c10/core/alloc_cpu.cpp)


def request_huge_pages() -> None:
    """Transparent huge pages for PyTorch's CPU blocks of 2 MiB or more, unless the user chose; Linux only."""
    if sys.platform.startswith("linux"):
        os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")


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
