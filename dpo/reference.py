"""Where reference log-probs come from: the one place that decides.

    kind = resolve_reference_kind(cfg, train_has_precomputed=...)   # "model" | "adapters_disabled" |
                                                                     # "precomputed" | "none" (reference-free)
    reference = build_reference(kind, cfg, accelerator)
    ref_chosen, ref_rejected = reference.logps(policy, batch)       # [B] each, no gradient

- model: a frozen copy of the starting policy (`model_path` + SFT adapter), or of `ref_model_path` when given;
  loaded once, eval mode, no gradients, in the frozen weights' dtype (`dpo.precision`). Under DeepSpeed ZeRO-3
  it is an inference-only engine, sharded like the policy.
- adapters_disabled: the policy itself with its LoRA adapters switched off (no second model in memory). The SFT
  adapter, if any, was merged into the base weights, so it stays on.
- precomputed: columns stored with the shards by `python -m dpo.precompute_ref`; no model is loaded. Used only
  when the fingerprint stored with them matches what is being trained (`dpo.precompute_ref.check_precomputed`).
- none: every loss of the objective is reference-free (`simpo`, `sft`; dpo.losses.reference_free decides).

`auto` takes the cheapest strategy that gives the right values: precomputed when the stored fingerprint matches
(train and, when present, eval), else adapters_disabled with LoRA (unless a separate `ref_model_path` is given),
else model. A precomputed set that does not match is never used by `auto`: it logs why and falls back to an
on-the-fly reference, which is always correct, only slower. An explicit `--reference precomputed` refuses instead.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dpo.config import TrainConfig
from dpo.data import PreferenceBatch
from dpo.errors import UserError
from dpo.logprobs import sequence_logps
from dpo.objective import answer_logps


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def resolve_reference_kind(cfg: TrainConfig, *, train_has_precomputed: bool,
                           log: Callable[[str], None] = _stderr) -> str:
    """The strategy for this run; raises UserError when an explicit choice cannot give the right reference."""
    from dpo.models import reference_source
    from dpo.precompute_ref import check_precomputed, precomputed_mismatch, splits_present

    if cfg.reference_free:
        return "none"
    separate_reference = reference_source(cfg)[0] != cfg.model_path
    if cfg.reference == "precomputed":
        if not train_has_precomputed:
            raise UserError(
                f"reference: 'precomputed' but {cfg.data_path}/train has no ref_chosen_logps/ref_rejected_logps; "
                f"run `python -m dpo.precompute_ref --model_path {cfg.model_path} --data_path {cfg.data_path}`"
            )
        for split in splits_present(cfg.data_path):
            check_precomputed(cfg, split)
        return "precomputed"
    if cfg.reference == "adapters_disabled":
        if separate_reference:
            raise UserError(f"reference: 'adapters_disabled' uses the policy's own base weights, but "
                            f"ref_model_path is {cfg.ref_model_path!r}; use --reference model for a separate model")
        return "adapters_disabled"
    if cfg.reference == "model":
        return "model"
    if train_has_precomputed and (cfg.sync_ref_model or cfg.ld_alpha is not None):
        log(f"[dpo] reference auto: not using the precomputed log-probs in {cfg.data_path} "
            f"({'sync_ref_model updates the reference' if cfg.sync_ref_model else 'they are not LD-DPO weighted'})")
    elif train_has_precomputed:
        problems = [p for p in (precomputed_mismatch(cfg, s) for s in splits_present(cfg.data_path)) if p]
        if not problems:
            return "precomputed"
        fallback = "adapters_disabled" if cfg.lora and not separate_reference else "model"
        log(f"[dpo] reference auto: not using the precomputed log-probs in {cfg.data_path} "
            f"({'; '.join(problems)}); computing them on the fly instead ({fallback})")
        return fallback
    if cfg.lora and not separate_reference:
        return "adapters_disabled"
    return "model"


@dataclass
class Reference:
    """Computes reference log-probs for a batch, by the strategy `kind`."""

    kind: str
    cfg: TrainConfig
    model: Any = None  # the frozen copy (possibly an inference-only DeepSpeed engine) for kind == "model"
    autocast: Any = contextlib.nullcontext

    @torch.no_grad()
    def logps(self, policy: torch.nn.Module | None, batch: PreferenceBatch, *, unwrapped_policy: Any = None
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Reference log-probs of the batch's chosen and rejected answers, [B] each (None, None when reference-free).

        Averaged per token exactly when training averages (`average_log_prob`), so the log-ratios compare like
        with like."""
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
            chosen, rejected = answer_logps(out, ld_alpha=self.cfg.ld_alpha)  # LD-DPO weighting, if on
            return chosen.detach(), rejected.detach()
        if self.kind == "adapters_disabled":
            if policy is None:
                raise ValueError("reference 'adapters_disabled' needs the policy")
            peft_model = unwrapped_policy if unwrapped_policy is not None else policy
            was_training = policy.training
            policy.eval()  # LoRA dropout is bypassed anyway; this keeps any remaining module deterministic
            try:
                with peft_model.disable_adapter(), self.autocast():
                    out = sequence_logps(policy, batch, average=self.cfg.average_log_prob,
                                         chunk_size=self.cfg.logits_chunk_size)
            finally:
                policy.train(was_training)
            chosen, rejected = answer_logps(out, ld_alpha=self.cfg.ld_alpha)  # LD-DPO weighting, if on
            return chosen.detach(), rejected.detach()
        raise ValueError(f"unknown reference kind {self.kind!r}")


def build_reference(kind: str, cfg: TrainConfig, accelerator: Any) -> Reference:
    """Load what the strategy needs: only the frozen copy loads a model (precomputed never does)."""
    if kind != "model":
        return Reference(kind=kind, cfg=cfg, autocast=accelerator.autocast)
    from dpo.models import load_reference_model, reference_source

    path, _ = reference_source(cfg)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"reference model {path!r} does not exist (ref_model_path defaults to model_path)")
    model = prepare_frozen_model(load_reference_model(cfg), accelerator)
    return Reference(kind=kind, cfg=cfg, model=model, autocast=accelerator.autocast)


def prepare_frozen_model(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Place a frozen model like the policy. Under DeepSpeed ZeRO-3 it becomes an inference-only engine, sharded
    like the policy and never gathered whole on one process; otherwise it just moves to the device."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from dpo.distributed import deepspeed_inference_engine

        return deepspeed_inference_engine(model, accelerator)
    return model.to(accelerator.device)
