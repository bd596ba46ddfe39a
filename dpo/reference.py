"""Where reference log-probs come from: the one place that decides.

    kind = resolve_reference_kind(cfg, train_has_precomputed=...)   # "model" | "adapters_disabled" |
                                                                     # "precomputed" | "none" (reference-free)
    reference = build_reference(kind, cfg, accelerator)
    ref_chosen, ref_rejected = reference.logps(policy, batch)       # [B] each, no gradient

- model: a frozen copy of the starting policy (or `ref_model_path`), eval mode, no gradients, policy dtype.
- adapters_disabled: the policy itself with its LoRA adapters switched off (no second model in memory).
- precomputed: columns stored with the shards by `python -m dpo.precompute_ref`; no model is loaded.
- none: reference-free losses (SimPO).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from dpo.config import TrainConfig
from dpo.data import PreferenceBatch
from dpo.logprobs import sequence_logps


def resolve_reference_kind(cfg: TrainConfig, *, train_has_precomputed: bool) -> str:
    if cfg.reference_free:
        return "none"
    if cfg.reference != "auto":
        if cfg.reference == "precomputed" and not train_has_precomputed:
            raise ValueError(
                f"reference: 'precomputed' but {cfg.data_path}/train has no ref_chosen_logps/ref_rejected_logps; "
                f"run `python -m dpo.precompute_ref --model_path {cfg.model_path} --data_path {cfg.data_path}`"
            )
        return cfg.reference
    if cfg.lora:
        return "adapters_disabled"
    if train_has_precomputed:
        return "precomputed"
    return "model"


@dataclass
class Reference:
    """Computes reference log-probs for a batch, by the strategy `kind`."""

    kind: str
    cfg: TrainConfig
    model: Any = None  # the frozen copy (possibly an inference-only DeepSpeed engine) for kind == "model"
    autocast: Any = contextlib.nullcontext

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module, batch: PreferenceBatch, *, unwrapped_policy: Any = None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.kind == "none":
            return None, None
        if self.kind == "precomputed":
            if batch.ref_chosen_logps is None or batch.ref_rejected_logps is None:
                raise ValueError("reference is 'precomputed' but this batch carries no reference log-probs")
            return batch.ref_chosen_logps, batch.ref_rejected_logps
        if self.kind == "model":
            with self.autocast():
                out = sequence_logps(self.model, batch, average=self.cfg.average_log_prob,
                                     chunk_size=self.cfg.logits_chunk_size)
            return out.chosen_logps.detach(), out.rejected_logps.detach()
        if self.kind == "adapters_disabled":
            peft_model = unwrapped_policy if unwrapped_policy is not None else policy
            was_training = policy.training
            policy.eval()  # LoRA dropout is bypassed anyway; this keeps any remaining module deterministic
            try:
                with peft_model.disable_adapter(), self.autocast():
                    out = sequence_logps(policy, batch, average=self.cfg.average_log_prob,
                                         chunk_size=self.cfg.logits_chunk_size)
            finally:
                policy.train(was_training)
            return out.chosen_logps.detach(), out.rejected_logps.detach()
        raise ValueError(f"unknown reference kind {self.kind!r}")


def build_reference(kind: str, cfg: TrainConfig, accelerator: Any) -> Reference:
    """Load what the strategy needs: only the frozen copy loads a model."""
    if kind != "model":
        return Reference(kind=kind, cfg=cfg, autocast=accelerator.autocast)
    from dpo.models import disable_dropout, load_causal_lm

    model = load_causal_lm(cfg.ref_model_path or cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    model.eval()
    model.requires_grad_(False)
    model = prepare_frozen_model(model, accelerator)
    return Reference(kind=kind, cfg=cfg, model=model, autocast=accelerator.autocast)


def prepare_frozen_model(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Place a frozen model like the policy. Under DeepSpeed ZeRO-3 it becomes an inference-only engine, sharded
    like the policy and never gathered whole on one process; otherwise it just moves to the device."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from dpo.distributed import deepspeed_inference_engine

        return deepspeed_inference_engine(model, accelerator)
    return model.to(accelerator.device)
