"""Top-k selections inside a model's forward that pick among the positions of the row: what no finite probe clears.

Some attention layers choose which keys a query sees by a top-k over scores of (pooled) earlier positions - an
indexer over compressed blocks (DeepSeek V3.2/V4 style sparse attention), expert-choice routing over tokens. The
candidate set of such a top-k grows with the row, so padding a sequence or packing it with others changes the set.
Padding and masked-out keys score -inf and are never picked while enough real keys remain, but when real scores tie
(a ReLU'd score of exactly 0 is common) the tie is broken by where the candidates sit and how many there are, and
that depends on the row, not the sequence: measured on a tiny DeepSeek V4, a 24-token sequence padded by 4 or more
is 0.03 nats off its single-sequence forward while 25- and 26-token ones are exact at every padding from 0 to 32.
A probe of finitely many sequences can miss such a pair of length and padding, so the probe does not try: it
watches the top-k calls of the single-sequence forwards and, where one selects fewer candidates than it has along a
dimension whose size changes with the sequence's length, only one sequence per forward is used.

A top-k over a fixed dimension (an MoE router choosing experts per token) is not a selection among positions and
is left alone; so is a top-k that keeps every candidate (k = n: no tie can change the set).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_TOP_K: tuple[Callable[..., Any], ...] = (torch.topk, torch.Tensor.topk)


def _call_site() -> str:
    """file:line of the first frame outside torch: the model code that called top-k."""
    frame = sys._getframe(2)
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(_TORCH_DIR):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


class SelectionWatch(TorchFunctionMode):
    """While active, records each top-k call as (call site) -> {(candidates n, kept k)}; `row_dependent()` names the
    sites that kept fewer than they had along a dimension whose size differed between the watched forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, set[tuple[int, int]]] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _TOP_K:
            values = args[0]
            k = args[1] if len(args) > 1 else kwargs["k"]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            if isinstance(values, torch.Tensor) and values.ndim > 0:
                self.calls.setdefault(_call_site(), set()).add((int(values.shape[dim]), int(k)))
        return func(*args, **kwargs)

    def row_dependent(self) -> list[str]:
        """Call sites of a partial top-k (k < n) whose n varied between forwards: a selection among positions."""
        return sorted(site for site, seen in self.calls.items()
                      if len({n for n, _ in seen}) > 1 and any(k < n for n, k in seen))
