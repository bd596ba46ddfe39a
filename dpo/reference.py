"""Where reference log-probs come from: the one place that decides, and the object the loop asks.

    data = check_data_contract(cfg, {"train": train_ds, "eval": eval_ds})   # dpo.contract: verified hashes
    kind = resolve_reference_kind(cfg, data)        # "model" | "adapters_disabled" | "precomputed" | "none"
    reference = build_reference(kind, cfg, accelerator, policy=policy, unwrapped_policy=unwrapped)
    ref_chosen, ref_rejected = reference.logps(batch)                       # [B] each, no gradient

- model: a frozen copy of the starting policy (`model_path` + SFT adapter), or of `ref_model_path` when given;
  loaded once, eval mode, no gradients, in the frozen weights' dtype (`dpo.precision`). Under DeepSpeed ZeRO-3
  it is an inference-only engine, sharded like the policy.
- adapters_disabled: the policy itself with its LoRA adapters switched off (no second model in memory), given to
  the reference when it is built. The SFT adapter, if any, was merged into the base weights, so it stays on.
- precomputed: columns stored with the shards by `python -m dpo.precompute_ref`; no model is loaded. Used only
  when the fingerprint stored with them matches what is being trained (`precomputed_mismatch`).
- none: every loss of the objective is reference-free (`simpo`, `sft`; dpo.losses.reference_free decides).

`auto` takes the cheapest strategy that gives the right values: precomputed when the stored fingerprint matches
(train and, when present, eval), else adapters_disabled with LoRA (unless a separate `ref_model_path` is given),
else model. A precomputed set that does not match is never used by `auto`: it logs why and falls back to an
on-the-fly reference, which is always correct, only slower. An explicit `--reference precomputed` refuses instead.
The fingerprints are compared here, once per run.

The fingerprint (`<split>/precomputed_ref.json`): sha256 of the reference's weight files in any format, of the SFT
adapter's (with adapter_config.json), the tokenizer's and the split's token columns' hashes as verified against
prep_report.json (`dpo.contract`), the number of pairs; `average_log_prob`, `mixed_precision` and the weights'
dtype.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.utils import DistributedType
from transformers import PreTrainedModel

from dpo.config import TrainConfig
from dpo.contract import REF_COLUMNS, PreparedData
from dpo.data import PreferenceBatch, has_ref_columns
from dpo.distributed import deepspeed_inference_engine
from dpo.errors import UserError
from dpo.fingerprint import adapter_sha256, weights_sha256
from dpo.logprobs import sequence_logps
from dpo.models import load_base_model
from dpo.objective import answer_logps
from dpo.precision import weights_label

KINDS = ("model", "adapters_disabled", "precomputed", "none")
FINGERPRINT_FILE = "precomputed_ref.json"
FINGERPRINT_VERSION = 2  # 2: every weight format, the chat template


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def reference_source(cfg: TrainConfig) -> tuple[str, str | None]:
    """(model folder, SFT adapter folder or None) of the reference: `ref_model_path` alone when given, otherwise
    the starting policy, i.e. `model_path` with `lora_adapter_path` merged in - never the bare base."""
    if cfg.ref_model_path and Path(cfg.ref_model_path).resolve() != Path(cfg.model_path).resolve():
        return cfg.ref_model_path, None
    return cfg.model_path, cfg.lora_adapter_path


# ----------------------------------------------------------------------------------------- fingerprints


def run_fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    """What precomputed values must have been computed with to be this run's reference, apart from the data."""
    path, adapter_path = reference_source(cfg)
    return {
        "version": FINGERPRINT_VERSION,
        "reference_model": str(Path(path).resolve()),
        "weights_sha256": weights_sha256(path),
        "adapter_path": str(Path(adapter_path).resolve()) if adapter_path else None,
        "adapter_sha256": adapter_sha256(adapter_path) if adapter_path else None,
        "average_log_prob": cfg.average_log_prob,
        "mixed_precision": cfg.mixed_precision,
        "dtype": weights_label(cfg, path),  # the reference weights as loaded: dtype, and quantisation if any
    }


def split_fingerprint(run: dict[str, Any], data: PreparedData, split: str) -> dict[str, Any]:
    """`run_fingerprint` plus the data's identity: the tokenizer's and `split`'s verified hashes, its pair count."""
    return {**run, "tokenizer_sha256": data.tokenizer_hash, "data_sha256": data.hashes[split],
            "num_pairs": len(data.splits[split])}


# (key, what differs, the setting that usually explains it). Paths are reported, never compared: a copied or moved
# model with the same weights is the same reference.
_COMPARED = (
    ("version", "fingerprint format", "a different dpo version wrote it"),
    ("weights_sha256", "reference model weights", "another model_path/ref_model_path, or the weights changed"),
    ("adapter_sha256", "SFT adapter merged into the reference", "another lora_adapter_path"),
    ("average_log_prob", "average_log_prob", "training and precomputing must both sum or both average"),
    ("data_sha256", "token columns of the data", "the shards changed after precomputing"),
    ("num_pairs", "number of pairs", "the shards changed after precomputing"),
    ("tokenizer_sha256", "tokenizer", "another tokenizer in data_path/tokenizer"),
    ("mixed_precision", "mixed_precision", "values computed in another precision"),
    ("dtype", "weights dtype", "values computed in another precision"),
)


def precomputed_mismatch(cfg: TrainConfig, data: PreparedData, split: str, *,
                         run: dict[str, Any] | None = None) -> str | None:
    """None when `split`'s precomputed log-probs are this run's reference; otherwise what is wrong, in words.
    `run`: this run's `run_fingerprint`, when the caller has it already."""
    split_dir = Path(cfg.data_path) / split
    if split not in data.splits:
        return f"{split_dir} does not exist"
    if not has_ref_columns(data.splits[split]):
        return f"{split_dir} has no {'/'.join(REF_COLUMNS)} columns"
    path = split_dir / FINGERPRINT_FILE
    if not path.is_file():
        return f"{path} is missing, so nothing says what the {'/'.join(REF_COLUMNS)} columns were computed with"
    stored = json.loads(path.read_text())
    expected = split_fingerprint(run if run is not None else run_fingerprint(cfg), data, split)
    diffs = []
    for key, what, why in _COMPARED:
        if stored.get(key) != expected[key]:
            shown = {"weights_sha256": "reference_model", "adapter_sha256": "adapter_path"}.get(key, key)
            old, new = stored.get(shown), expected[shown]
            if shown == key and key.endswith("sha256"):
                old, new = str(old)[:12], str(new)[:12]
            diffs.append(f"{what}: precomputed with {old!r}, this run has {new!r} ({why})")
    if not diffs:
        return None
    return f"{split}: " + "; ".join(diffs)


def check_precomputed(cfg: TrainConfig, data: PreparedData, split: str, *, run: dict[str, Any] | None = None
                      ) -> None:
    """Raise UserError naming every difference between `split`'s precomputed fingerprint and this run."""
    problem = precomputed_mismatch(cfg, data, split, run=run)
    if problem is not None:
        raise UserError(
            f"precomputed reference log-probs in {cfg.data_path} do not match this run: {problem}. Recompute them "
            f"with `python -m dpo.precompute_ref` and the same config as training (--model_path {cfg.model_path} "
            f"--data_path {cfg.data_path} --average_log_prob {str(cfg.average_log_prob).lower()} "
            f"--mixed_precision {cfg.mixed_precision}), or train with --reference model")


# ----------------------------------------------------------------------------------------- the decision


def resolve_reference_kind(cfg: TrainConfig, data: PreparedData, *, log: Callable[[str], None] = _stderr) -> str:
    """The strategy for this run, with the precomputed fingerprints checked for every split of `data`; raises
    UserError when an explicit choice cannot give the right reference."""
    if cfg.reference_free:
        return "none"
    separate_reference = reference_source(cfg)[0] != cfg.model_path
    train_has_precomputed = has_ref_columns(data.splits["train"])
    if cfg.reference == "precomputed":
        if not train_has_precomputed:
            raise UserError(
                f"reference: 'precomputed' but {cfg.data_path}/train has no ref_chosen_logps/ref_rejected_logps; "
                f"run `python -m dpo.precompute_ref --model_path {cfg.model_path} --data_path {cfg.data_path}`"
            )
        run = run_fingerprint(cfg)
        for split in data.splits:
            check_precomputed(cfg, data, split, run=run)
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
        run = run_fingerprint(cfg)
        problems = [p for p in (precomputed_mismatch(cfg, data, s, run=run) for s in data.splits) if p]
        if not problems:
            return "precomputed"
        fallback = "adapters_disabled" if cfg.lora and not separate_reference else "model"
        log(f"[dpo] reference auto: not using the precomputed log-probs in {cfg.data_path} "
            f"({'; '.join(problems)}); computing them on the fly instead ({fallback})")
        return fallback
    if cfg.lora and not separate_reference:
        return "adapters_disabled"
    return "model"


# ----------------------------------------------------------------------------------------- the strategies


@dataclass(frozen=True)
class Reference:
    """Computes reference log-probs for a batch by the strategy `kind`, holding what that strategy needs."""

    kind: str
    model: Any = None  # "model": the frozen copy (possibly an inference-only DeepSpeed engine)
    policy: Any = None  # "adapters_disabled": the policy as the loop calls it (it runs the forward)
    peft_model: Any = None  # "adapters_disabled": the unwrapped PeftModel whose adapters are switched off
    average: bool = False  # per-token means, exactly when training averages (`average_log_prob`)
    chunk_size: int = 256  # `logits_chunk_size`
    ld_alpha: float | None = None  # LD-DPO weighting of the answers, as for the policy
    autocast: Callable[[], Any] = contextlib.nullcontext

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown reference kind {self.kind!r}")
        if self.kind == "model" and self.model is None:
            raise ValueError("reference 'model' needs the frozen model")
        if self.kind == "adapters_disabled" and (self.policy is None or self.peft_model is None):
            raise ValueError("reference 'adapters_disabled' needs the policy")

    @torch.no_grad()
    def logps(self, batch: PreferenceBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
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
                out = sequence_logps(self.model, batch, average=self.average, chunk_size=self.chunk_size)
        else:  # adapters_disabled
            was_training = self.policy.training
            self.policy.eval()  # LoRA dropout is bypassed anyway; this keeps any remaining module deterministic
            try:
                with self.peft_model.disable_adapter(), self.autocast():
                    out = sequence_logps(self.policy, batch, average=self.average, chunk_size=self.chunk_size)
            finally:
                self.policy.train(was_training)
        chosen, rejected = answer_logps(out, ld_alpha=self.ld_alpha)  # LD-DPO weighting, if on
        return chosen.detach(), rejected.detach()


def make_reference(kind: str, cfg: TrainConfig, *, model: Any = None, policy: Any = None, peft_model: Any = None,
                   autocast: Callable[[], Any] = contextlib.nullcontext) -> Reference:
    """A Reference of `kind` from parts already built: the frozen `model` for "model"; the `policy` (and, when it
    is wrapped, the unwrapped `peft_model`) for "adapters_disabled"; nothing for the others."""
    return Reference(kind=kind, model=model if kind == "model" else None,
                     policy=policy if kind == "adapters_disabled" else None,
                     peft_model=(peft_model if peft_model is not None else policy) if kind == "adapters_disabled"
                     else None,
                     average=cfg.average_log_prob, chunk_size=cfg.logits_chunk_size, ld_alpha=cfg.ld_alpha,
                     autocast=autocast)


def build_reference(kind: str, cfg: TrainConfig, accelerator: Any, *, policy: Any = None,
                    unwrapped_policy: Any = None) -> Reference:
    """The reference of `kind`, with what it needs: only the frozen copy loads a model (precomputed never does);
    adapters_disabled takes the `policy` as prepared and its `unwrapped_policy` (the PeftModel)."""
    model = None
    if kind == "model":
        path, _ = reference_source(cfg)
        if not Path(path).is_dir():
            raise FileNotFoundError(f"reference model {path!r} does not exist (ref_model_path defaults to "
                                    f"model_path)")
        model = prepare_frozen_model(load_reference_model(cfg), accelerator)
    return make_reference(kind, cfg, model=model, policy=policy, peft_model=unwrapped_policy,
                          autocast=accelerator.autocast)


def load_reference_model(cfg: TrainConfig) -> PreTrainedModel:
    """The frozen copy: loaded once, eval mode, no gradients, in the frozen weights' dtype (`dpo.precision`)."""
    path, adapter_path = reference_source(cfg)
    model = load_base_model(path, adapter_path=adapter_path, cfg=cfg, frozen=True)
    model.eval()
    model.requires_grad_(False)
    return model


def prepare_frozen_model(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """Place a frozen model like the policy. Under DeepSpeed ZeRO-3 it becomes an inference-only engine, sharded
    like the policy and never gathered whole on one process; otherwise it just moves to the device."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return deepspeed_inference_engine(model, accelerator)
    return model.to(accelerator.device)
