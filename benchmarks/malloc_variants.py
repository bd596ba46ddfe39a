"""glibc malloc settings other than `dpo/host_memory.py`'s, for the host-memory benchmarks (issue 22).

    BENCH_MALLOC=trim_steps python -m benchmarks.bench_throughput --rows prefix_shared/model --no-bf16 \
        --matmul-size 512 --threads 1
    BENCH_MALLOC=trim_steps python -m benchmarks.bench_memory --rows full@1k

The rows of bench_throughput and bench_memory call `apply_setting()` where dpo.train calls `return_freed_memory()`:
without BENCH_MALLOC (or with `default`) that is exactly what they do. The others, each measured in the README
("Host memory against speed"):

- `glibc`: glibc's own threshold, nothing else (what `MALLOC_MMAP_THRESHOLD_` unset and no `dpo/host_memory.py`
  would give)
- `trim_optimizer`: glibc's own threshold; `malloc_trim(0)` before the optimizer step only (the backward's freed
  activations go back to the OS; the forward's temporaries stay in the heap for the backward to reuse)
- `trim_steps`: glibc's own threshold; `malloc_trim(0)` when the policy's forward ends and before the optimizer step
  (the two moments after which the heap holds the most freed memory: the forward's temporaries, the backward's
  activations)
- `trim_layers`: the same, and when the backward reaches each decoder layer
- `trim_forward`: the same as trim_steps, and when the policy's forward starts (the reference forward's temporaries)
- `policy_only`: glibc's heap for the reference forward and the optimizer step, 1 MiB from the policy's forward to
  the optimizer step, trimmed at each switch
- `backward_only`: 1 MiB from the end of the policy's forward to the optimizer step
- `head_only`: 1 MiB from the end of the policy's forward until the backward leaves the LM head and the final norm
- `arena1`: glibc's own threshold, one malloc arena (M_ARENA_MAX)
- `top_pad`: 1 MiB, and the heap's top kept (M_TRIM_THRESHOLD and M_TOP_PAD at 64 MiB)

The switches are global module and optimizer hooks (a causal LM's forward with gradients enabled is the policy's;
the reference runs without), so the benchmarks' own code stays the trainer's. Linux with glibc only.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from typing import Any, Callable

import torch

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -2, -3, -8  # glibc's <malloc.h>
LOW, HIGH = 1 << 20, 32 << 20  # dpo/host_memory.py's threshold; the highest glibc reaches on its own
SETTINGS = ("default", "glibc", "trim_optimizer", "trim_steps", "trim_layers", "trim_forward", "policy_only",
            "backward_only", "head_only", "arena1", "top_pad")


def _libc() -> Any:
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def _is_policy_forward(module: torch.nn.Module) -> bool:
    return type(module).__name__.endswith("ForCausalLM") and torch.is_grad_enabled()


def _on_policy_forward(*, start: Callable[[], Any] | None = None, end: Callable[[], Any] | None = None) -> None:
    # The hooks return None: a forward pre-hook's value would replace the inputs, a forward hook's the output.
    def pre_hook(module: torch.nn.Module, args: Any) -> None:
        if start is not None and _is_policy_forward(module):
            start()

    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        if end is not None and _is_policy_forward(module):
            end()

    torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    torch.nn.modules.module.register_module_forward_hook(hook)


def _before_optimizer_step(action: Callable[[], Any]) -> None:
    optimizer = importlib.import_module("torch.optim.optimizer")  # torch.optim does not export the submodule

    def pre_hook(*args: Any) -> None:  # None: a value would replace the step's arguments
        action()

    optimizer.register_optimizer_step_pre_hook(pre_hook)


def _when_backward_reaches(class_suffix: str, action: Callable[[], Any], *, last_only: bool = False) -> None:
    """`action` when the backward reaches the output of each module whose class name ends with `class_suffix`
    (`last_only`: the last such module a policy forward ran, e.g. the final norm)."""
    def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
        tensor = out[0] if isinstance(out, tuple) else out
        if not (type(module).__name__.endswith(class_suffix) and torch.is_grad_enabled()):
            return
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            handle = tensor.register_hook(lambda grad: (action(), None)[1])  # None: the gradient unchanged
            if last_only and getattr(hook, "previous", None) is not None:
                hook.previous.remove()
            hook.previous = handle
    torch.nn.modules.module.register_module_forward_hook(hook)


def apply_setting(name: str | None = None) -> str:
    """Install setting `name` (default: $BENCH_MALLOC, else `default`); returns the name applied."""
    from dpo.host_memory import return_freed_memory

    name = name or os.environ.get("BENCH_MALLOC") or "default"
    if name not in SETTINGS:
        raise ValueError(f"BENCH_MALLOC={name!r}: choose from {', '.join(SETTINGS)}")
    if name == "default":
        return_freed_memory()
        return name
    libc = _libc()

    def trim() -> None:
        libc.malloc_trim(0)

    def threshold(value: int) -> Callable[[], None]:
        return lambda: libc.mallopt(M_MMAP_THRESHOLD, value)

    if name == "trim_optimizer":
        _before_optimizer_step(trim)
    elif name.startswith("trim_"):
        _on_policy_forward(start=trim if name == "trim_forward" else None, end=trim)
        _before_optimizer_step(trim)
        if name == "trim_layers":
            _when_backward_reaches("DecoderLayer", trim)
    elif name in ("policy_only", "backward_only", "head_only"):
        threshold(HIGH)()
        low = lambda: (trim(), threshold(LOW)())  # noqa: E731 - a pair of calls
        _on_policy_forward(start=low if name == "policy_only" else None, end=None if name == "policy_only" else low)
        _before_optimizer_step(lambda: (threshold(HIGH)(), trim()))
        if name == "head_only":
            _when_backward_reaches("Norm", threshold(HIGH), last_only=True)
    elif name == "arena1":
        libc.mallopt(M_ARENA_MAX, 1)
    elif name == "top_pad":
        return_freed_memory()
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.mallopt(M_TOP_PAD, 64 << 20)
    return name
