"""The divergence guard: a run stops before a NaN or infinity reaches the weights or anything saved, and warns
loudly when the loss spikes or the weights blow up while still finite.

    guard = DivergenceGuard(trainable_params, accelerator, log=log)
    guard.check_step(step, loss, grad_norm)     # before optimizer.step(): non-finite loss or grad norm -> stop
    guard.check_weights(step)                   # after it, before any save: non-finite weights -> stop; growth -> warn

Both raise `TrainingDiverged`; the caller has saved nothing from the bad step, so the last checkpoint is clean.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Callable

import torch

from dpo.errors import TrainingDiverged

# Warn when the trainable weights' norm reaches 10x, 100x, ... its value at the start of this process: no sane
# preference-tuning step moves the weights that far (learning rate 1e-5..1e-3 changes them by well under 1%).
WEIGHT_GROWTH_WARN = 10.0
# A loss spike: more than 3x the median of the last 20 steps and at least 1 nat above it.
SPIKE_WINDOW, SPIKE_FACTOR, SPIKE_MIN_JUMP = 20, 3.0, 1.0
ADVICE = "Lower the learning rate or beta, check the data"


class DivergenceGuard:
    def __init__(self, params: list[torch.Tensor], accelerator: Any, *, log: Callable[[str], None]) -> None:
        self.params = params
        self.accelerator = accelerator
        self.log = log
        self.recent_losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.start_norm = self.weight_norm()[0]
        self.warned_growth = 1.0

    def _local(self, param: torch.Tensor) -> torch.Tensor:
        # ZeRO-3 keeps only this process's partition in ds_tensor; the parameter itself is an empty placeholder.
        return getattr(param, "ds_tensor", param).detach()

    def weight_norm(self) -> tuple[float, bool]:
        """(L2 norm of the trainable weights, whether every weight is finite), the same on every process. The norm
        is inf when finite weights overflow float32 squares (|w| > ~1e19): blown up, but not yet NaN."""
        local = [self._local(p) for p in self.params if self._local(p).numel()]
        device = local[0].device if local else self.accelerator.device
        squares = torch.zeros((), dtype=torch.float64, device=device)
        bad = torch.zeros((), dtype=torch.float64, device=device)
        if local:
            norms = torch.stack([torch.linalg.vector_norm(t.float()) for t in local]).double()
            squares = norms.pow(2).sum()
            for i in torch.nonzero(~torch.isfinite(norms)).flatten().tolist():
                bad += float(not torch.isfinite(local[i]).all())
        if any(hasattr(p, "ds_tensor") for p in self.params) and self.accelerator.num_processes > 1:
            both = self.accelerator.reduce(torch.stack([squares, bad]).to(self.accelerator.device), reduction="sum")
            squares, bad = both[0], both[1]
        return math.sqrt(float(squares)), float(bad) == 0

    def check_step(self, step: int, loss: float, grad_norm: float | None, *, not_applied: str) -> None:
        """Before the optimizer step: stop on a non-finite loss or gradient norm; warn on a loss spike."""
        if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise TrainingDiverged(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {step}; "
                                   f"{not_applied} and nothing from it was saved. {ADVICE}, and resume from the "
                                   f"last checkpoint")
        if len(self.recent_losses) >= 5:
            median = statistics.median(self.recent_losses)
            if loss > SPIKE_FACTOR * median and loss - median > SPIKE_MIN_JUMP:
                self.log(f"[dpo] WARNING: loss spike at step {step}: {loss:.4f} against a median of {median:.4f} "
                         f"over the last {len(self.recent_losses)} steps. {ADVICE}")
        self.recent_losses.append(loss)

    def check_weights(self, step: int) -> float:
        """After the optimizer step and before anything is saved: stop on non-finite weights; warn when they grow
        past 10x (then 100x, ...) their starting norm. Returns the norm."""
        norm, finite = self.weight_norm()
        if not finite:
            raise TrainingDiverged(f"non-finite weights after step {step}; nothing from this step was saved. "
                                   f"{ADVICE}, and resume from the last checkpoint")
        growth = norm / self.start_norm if self.start_norm > 0 else 1.0
        if growth >= WEIGHT_GROWTH_WARN * self.warned_growth:  # once per power of ten (once for an overflow)
            self.warned_growth = math.inf if math.isinf(growth) else 10.0 ** math.floor(math.log10(growth))
            self.log(f"[dpo] WARNING: the trainable weights' norm is {norm:.4g} at step {step}, {growth:.0f}x its "
                     f"{self.start_norm:.4g} at the start: training is blowing up. {ADVICE}")
        return norm
