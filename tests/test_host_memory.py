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


TRIM_PROBE = """
import json, sys, torch
from pathlib import Path
from benchmarks.malloc_variants import apply_setting

def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

applied = apply_setting()
class TinyForCausalLM(torch.nn.Module):  # what the hooks recognise as the policy
    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(64, 64)
    def forward(self, x):
        self.kept = [torch.ones(1 << 18) for _ in range(64)]  # 64 x 1 MiB freed between two live blocks
        for i in range(0, 64, 2):
            self.kept[i] = None
        return self.inner(x)
policy = TinyForCausalLM()
big = torch.ones(24 << 20, dtype=torch.uint8)  # a mapping; freeing it raises glibc's own threshold to 24 MiB
del big
optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
before = rss_mb()
policy(torch.ones(1, 64)).sum().backward()  # the forward's end trims under the trim_* settings
after_forward = rss_mb()
optimizer.step()
print(json.dumps({"applied": applied, "kept_mb": after_forward - before}))
"""


def trim_probe(setting: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               BENCH_MALLOC=setting)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.run([sys.executable, "-c", TRIM_PROBE], env=env, capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_the_benchmarks_trim_setting_returns_freed_heap_memory_when_the_policy_forward_ends() -> None:
    """benchmarks/malloc_variants.py, which the README's host-memory figures used: under `arena1` (glibc's own
    threshold, nothing trimmed) half of 64 x 1 MiB blocks freed between live ones stays resident; under `trim_steps`
    the end of the policy's forward gives it back."""
    kept = trim_probe("arena1")
    trimmed = trim_probe("trim_steps")
    assert kept["applied"] == "arena1" and trimmed["applied"] == "trim_steps"
    assert kept["kept_mb"] >= 60  # all 64 MiB: the 32 freed blocks stay in the heap, resident
    assert trimmed["kept_mb"] <= 40  # the 32 freed MiB went back: about the 32 live ones remain
