"""The trainer's own pieces as the benchmarks drive them, wired as dpo.train wires them, so a benchmark times the
code a run executes: the prepared policy, its optimizer and the reference; one optimizer update."""

from __future__ import annotations

from typing import Any

import torch

from dpo.config import TrainConfig
from dpo.models import load_policy
from dpo.reference import Reference, build_reference
from dpo.train import build_optimizer


def prepared_models(cfg: TrainConfig, accelerator: Any, *, reference_kind: str = "model"
                    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Reference]:
    """The policy (train mode) and its optimizer through `accelerator.prepare`, then the reference of that kind."""
    policy = load_policy(cfg)
    policy.train()
    optimizer = build_optimizer(policy, cfg)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    reference = build_reference(reference_kind, cfg, accelerator, policy=policy,
                                unwrapped_policy=accelerator.unwrap_model(policy))
    return policy, optimizer, reference


def update(policy: torch.nn.Module, optimizer: torch.optim.Optimizer, accelerator: Any, loss: torch.Tensor,
           cfg: TrainConfig) -> None:
    """Backward, clipping, the optimizer step and freed gradients: everything of a step after the forward."""
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
