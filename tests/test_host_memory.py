"""dpo/host_memory.py: after `return_freed_memory()`, a tensor of 1 MiB or more is its own mapping (glibc counts it
in `mallinfo2().hblkhd`), so freeing it returns its memory; a threshold set in the environment is left alone.
Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import ctypes, json, sys, torch
from dpo.host_memory import return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
big = torch.ones(24 << 20, dtype=torch.uint8)  # a mapping; freeing it raises glibc's threshold to 24 MiB
del big
threshold = return_freed_memory() if sys.argv[1] == "call" else None
before = libc.mallinfo2().hblkhd
kept = [torch.ones(2 << 20, dtype=torch.uint8) for _ in range(8)]  # 8 x 2 MiB
during = libc.mallinfo2().hblkhd
del kept
after = libc.mallinfo2().hblkhd
print(json.dumps({"threshold": threshold, "mapped_mb": (during - before) / 2**20, "left_mb": (after - before) / 2**20}))
"""


def probe(*, call: bool, user_threshold: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if user_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(user_threshold)
    proc = subprocess.run([sys.executable, "-c", PROBE, "call" if call else "no"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_tensors_become_mappings_returned_on_free() -> None:
    assert probe(call=False)["mapped_mb"] == 0  # glibc on its own: in the heap, after one larger block was freed
    got = probe(call=True)
    assert got["threshold"] == 1 << 20
    assert got["mapped_mb"] >= 16  # every 2 MiB tensor is its own mapping
    assert got["left_mb"] < 1  # and each went back when freed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_threshold_set_by_the_user_is_kept() -> None:
    got = probe(call=True, user_threshold=64 << 20)
    assert got["threshold"] is None
    assert got["mapped_mb"] == 0  # 2 MiB blocks stay in the heap under the user's 64 MiB threshold
