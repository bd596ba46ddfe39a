"""Loading the policy (optionally wrapped in LoRA adapters) and saving the final model.

Weights load as safetensors only, and `trust_remote_code` stays off unless the config asks for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from dpo.config import TrainConfig


def load_causal_lm(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32
                   ) -> PreTrainedModel:
    if not Path(path).exists():
        raise FileNotFoundError(f"model path {path!r} does not exist (models load from local folders only)")
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, local_files_only=True,
    )


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer the data was prepared with (data_path/tokenizer), else the model's."""
    prepared = Path(cfg.data_path) / "tokenizer"
    source = str(prepared) if prepared.is_dir() else cfg.model_path
    return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, local_files_only=True)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the base model, so the policy and its reference agree exactly at step 0 (LoRA dropout,
    added later, still applies)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def load_policy(cfg: TrainConfig) -> PreTrainedModel:
    """The trainable policy: the SFT model, or it plus a fresh LoRA adapter (an SFT adapter merged first)."""
    model = load_causal_lm(cfg.model_path, trust_remote_code=cfg.trust_remote_code)
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not cfg.lora:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if cfg.lora_adapter_path:
        # The SFT adapter becomes part of the frozen base: the reference (adapters disabled) is base + SFT.
        model = PeftModel.from_pretrained(model, cfg.lora_adapter_path).merge_and_unload()
    lora_config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules or "all-linear",  # all-linear leaves the LM head out
        task_type="CAUSAL_LM",
    )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config)


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a requirement
        return False
    return isinstance(model, PeftModel)


def atomic_replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written `tmp` over `final`; an older `final` is removed only after `tmp` is complete."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
