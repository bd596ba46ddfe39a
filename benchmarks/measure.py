"""What the benchmarks measure with: device sync, peak memory, the matmul ceilings MFU divides by, the hardware."""

from __future__ import annotations

import math
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch
import transformers


def sync_device(device: str) -> None:
    """Wait for the device's queued work, so a wall-clock reading covers it (a no-op on the CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(device: str) -> float:
    """Peak allocated memory on CUDA; on the CPU the process's peak RSS (VmHWM, else ru_maxrss)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2 ** 20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def matmul_gflops(dtype: torch.dtype, device: str, *, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` rate of one size x size matmul, in GFLOP/s."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = math.inf
    for i in range(repeats + 1):
        sync_device(device)
        start = time.perf_counter()
        torch.mm(a, b)
        sync_device(device)
        if i:  # the first call warms up
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def matmul_rates(device: str, size: int, *, repeats: int) -> dict[str, float]:
    """The fp32 and bf16 ceilings MFU is measured against. On a CPU without bf16 instructions a bf16 matmul takes
    a slow path (about 1 GFLOP/s on the 2-core test machine, 20 s per 2048² product): `--matmul-size` shrinks it."""
    return {"fp32": matmul_gflops(torch.float32, device, size=size, repeats=repeats),
            "bf16": matmul_gflops(torch.bfloat16, device, size=size, repeats=repeats)}


def hardware() -> dict[str, Any]:
    """The machine and the versions a result was measured with."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    # Host-memory settings change CPU step times (dpo/host_memory.py): the kernel's huge-page mode and the variables.
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    info["transparent_hugepage"] = thp.read_text().strip() if thp.is_file() else None
    info["host_memory_env"] = {k: os.environ[k] for k in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_THRESHOLD_")
                               if k in os.environ}
    return info
