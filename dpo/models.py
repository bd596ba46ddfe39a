"""Loading models: the policy (optionally wrapped in LoRA adapters), the base models it and a frozen reference start
from (dropout off), and the tokenizer.

Weights load as safetensors only, and `trust_remote_code` stays off unless the config asks for it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from dpo.attention import resolve_attn_implementation
from dpo.config import TrainConfig
from dpo.precision import frozen_weights_dtype, keep_4bit_layers_differentiable, quantization_config


def load_causal_lm(path: str, *, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32,
                   quantization: Any = None, attn_implementation: str | None = None) -> PreTrainedModel:
    """`attn_implementation`: a concrete name (`dpo.attention.resolve_attn_implementation`); None leaves the choice
    to transformers (sdpa where the model has it)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"model path {path!r} does not exist (models load from local folders only)")
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, local_files_only=True,
        quantization_config=quantization, attn_implementation=attn_implementation,
    )
    if quantization is not None:
        keep_4bit_layers_differentiable(model)
    return model


def load_tokenizer(cfg: TrainConfig) -> PreTrainedTokenizerBase:
    """The tokenizer the data was prepared with (data_path/tokenizer), else the model's."""
    prepared = Path(cfg.data_path) / "tokenizer"
    source = str(prepared) if prepared.is_dir() else cfg.model_path
    return AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, local_files_only=True)


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of the base model off, so the policy equals its reference at step 0 and two train-mode forwards
    of a batch are identical (LoRA dropout, added later, still applies).

    Dropout hides in three places: `nn.Dropout` modules, rates that modules copy into plain float attributes at
    init and use in forward (OPT's `dropout` and `layerdrop`, GPTBigCode's `attn_dropout`/`resid_dropout`, XGLM),
    and config fields read at forward time (`config.attention_dropout`). All three are zeroed.

    Other train-time randomness, found by auditing the causal LMs of transformers 5.25 (`self.training` next to
    random draws): MoE routers that scale their input by uniform noise (Mixtral, MiniMax, MiniMax-M2 `jitter_noise`
    from `router_jitter_noise`; PhiMoE `input_jitter_noise`; DBRX `moe_jitter_eps`) are zeroed here, as module
    attributes only: PhiMoE's `router_jitter_noise` is also a threshold of its eval-mode routing, so the config,
    which a saved model carries, keeps it. Layer drop and stochastic depth go with dropout (`layerdrop`,
    `drop_path`). What cannot be switched off (PhiMoE's sampling router, BigBird's random blocks, Reformer's
    hashing) is left as it is: the layout probe finds a model still random in train mode and refuses it unless
    the user allows it (dpo.layouts).
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if type(value) is float and (_DROPOUT_NAME.search(name) or name in _JITTER_ATTRIBUTES):
                setattr(module, name, 0.0)
    for config in _configs(getattr(model, "config", None)):
        for name, value in list(vars(config).items()):
            if type(value) is float and _DROPOUT_NAME.search(name):
                setattr(config, name, 0.0)


_DROPOUT_NAME = re.compile(r"dropout|pdrop|layerdrop|drop_prob|drop_rate|drop_path", re.IGNORECASE)
# Module attributes of multiplicative router noise in train mode (see disable_dropout).
_JITTER_ATTRIBUTES = frozenset({"jitter_noise", "input_jitter_noise", "moe_jitter_eps"})


def _configs(config: PretrainedConfig | None) -> list[PretrainedConfig]:
    """A config and every config nested in it (text_config, vision_config, ...)."""
    found, stack = [], [config]
    while stack:
        current = stack.pop()
        if isinstance(current, PretrainedConfig) and all(current is not c for c in found):
            found.append(current)
            stack.extend(v for v in vars(current).values() if isinstance(v, PretrainedConfig))
    return found


def load_base_model(path: str, *, adapter_path: str | None, cfg: TrainConfig, frozen: bool = False
                    ) -> PreTrainedModel:
    """A model folder, dropout off, with an SFT LoRA adapter merged into its weights when `adapter_path` is set.
    `frozen` weights (a LoRA base, a reference copy) load in `--torch_dtype`, quantised with --load_in_4bit/8bit."""
    # Trainable weights load as fp32 master weights, `mixed_precision` applied by autocast (DeepSpeed casts its
    # engines to its 16-bit dtype itself); frozen ones in `--torch_dtype` (dpo.precision).
    dtype = frozen_weights_dtype(cfg, path) if frozen else torch.float32
    implementation = cfg.attn_implementation
    if implementation == "auto":  # a caller that did not resolve it for its device (dpo.train and precompute do)
        implementation = resolve_attn_implementation(
            "auto", path, device_type="cuda" if torch.cuda.is_available() else "cpu", needs_backward=True,
            trust_remote_code=cfg.trust_remote_code)
    model = load_causal_lm(path, trust_remote_code=cfg.trust_remote_code, dtype=dtype,
                           quantization=quantization_config(cfg) if frozen else None,
                           attn_implementation=implementation)
    if adapter_path:
        if not Path(adapter_path).is_dir():
            raise FileNotFoundError(f"lora_adapter_path {adapter_path!r} does not exist")
        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    disable_dropout(model)
    return model


def load_policy(cfg: TrainConfig) -> PreTrainedModel:
    """The trainable policy: the SFT model, or it plus a fresh LoRA adapter (an SFT adapter merged first)."""
    # The SFT adapter becomes part of the frozen base: the reference (adapters disabled) is base + SFT.
    model = load_base_model(cfg.model_path, adapter_path=cfg.lora_adapter_path if cfg.lora else None, cfg=cfg,
                            frozen=cfg.lora)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not cfg.lora:
        return model
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
    return isinstance(model, PeftModel)
