"""Which attention kernel a run uses, and what form of mask it takes.

    resolve_attn_implementation(requested, model_path, device_type=..., needs_backward=...)  -> a concrete name
    mask_form(implementation)  -> "dense" | "block" | "varlen"

`--attn_implementation auto` picks FlexAttention on CUDA for models whose transformers class supports it (block-sparse
masks, no [T x T] tensor) and sdpa elsewhere. An implementation the model or machine cannot run is refused with one
line (`AttentionUnavailable`, exit 2) before anything is loaded or written; it is never swapped for another.

The mask form follows from the kernel: eager and sdpa take the dense additive masks of `dpo.masks`; flex_attention
takes a `BlockMask` built from the same rules (`dpo.masks.SegmentMask`); FlashAttention takes no custom mask at all,
only position ids, from which transformers derives the sequence boundaries of packed rows (its varlen path), so
prefix sharing, which needs a custom mask, is not possible there.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
from transformers import AutoConfig, AutoModelForCausalLM

from dpo.errors import UserError

IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
FLASH = ("flash_attention_2", "flash_attention_3")
# The module each FlashAttention generation imports (the flash-attn and flash-attn-3 packages).
FLASH_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


class AttentionUnavailable(UserError):
    """A requested attention implementation that this model or machine cannot run."""


def mask_form(implementation: str) -> str:
    """dense: [R, 1, T, T] additive masks; block: FlexAttention BlockMasks; varlen: position ids only."""
    if implementation == "flex_attention":
        return "block"
    if implementation in FLASH:
        return "varlen"
    return "dense"


def model_class_of(model_path: str, *, trust_remote_code: bool = False) -> type | None:
    """The transformers causal-LM class a model folder loads as (None when transformers does not know it: custom
    code, whose own checks then apply at load time)."""
    try:
        config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    return AutoModelForCausalLM._model_mapping.get(type(config), None)


def resolve_attn_implementation(requested: str, model_path: str, *, device_type: str, needs_backward: bool,
                                trust_remote_code: bool = False) -> str:
    """The concrete implementation for `requested` on this model and device, or AttentionUnavailable.

    needs_backward: the model is trained through (the policy, a LoRA base); FlexAttention has no backward on CPU
    in torch 2.13, while its forward serves no-grad work there (a frozen reference, precompute_ref)."""
    if requested not in IMPLEMENTATIONS:
        raise AttentionUnavailable(f"attn_implementation: {requested!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    model_class = model_class_of(model_path, trust_remote_code=trust_remote_code)
    name = model_class.__name__ if model_class is not None else Path(model_path).name
    supports = {
        "sdpa": getattr(model_class, "_supports_sdpa", True),
        "flex_attention": getattr(model_class, "_supports_flex_attn", True),
        "flash_attention_2": getattr(model_class, "_supports_flash_attn", True),
        "flash_attention_3": getattr(model_class, "_supports_flash_attn", True),
        "eager": True,
    }
    if requested == "auto":
        if device_type == "cuda" and supports["flex_attention"] and flex_available():
            return "flex_attention"
        return "sdpa" if supports["sdpa"] else "eager"
    if not supports[requested]:
        raise AttentionUnavailable(f"attn_implementation {requested}: {name} does not support it in transformers "
                                   f"(use auto, sdpa or eager)")
    if requested == "flex_attention":
        if not flex_available():
            raise AttentionUnavailable(f"attn_implementation flex_attention: torch {torch.__version__} has no "
                                       f"FlexAttention (torch >= 2.5 needed)")
        if device_type == "cpu" and needs_backward:
            raise AttentionUnavailable(f"attn_implementation flex_attention: torch {torch.__version__} has no "
                                       f"FlexAttention backward on CPU, so a CPU run cannot train with it; use sdpa "
                                       f"(or auto) here; flex_attention serves training on CUDA and no-grad forwards "
                                       f"(precompute_ref) on CPU")
    if requested in FLASH:
        module = FLASH_MODULES[requested]
        if device_type != "cuda":
            raise AttentionUnavailable(f"attn_implementation {requested}: FlashAttention runs on CUDA GPUs only, "
                                       f"and this run is on {device_type}")
        if importlib.util.find_spec(module) is None:
            package = "flash-attn" if requested == "flash_attention_2" else "flash-attn-3"
            raise AttentionUnavailable(f"attn_implementation {requested}: the {package} package ({module}) is not "
                                       f"installed")
    return requested


def resolve_for_run(cfg: Any, *, device_type: str, needs_backward: bool) -> Any:
    """`cfg` with `attn_implementation` made concrete for every model the run loads (the policy and a frozen
    reference from another folder read the same masks, so they run the same kernel: `auto` takes the first of
    flex_attention, sdpa, eager that all of them support)."""
    paths = [cfg.model_path] + ([cfg.ref_model_path] if getattr(cfg, "ref_model_path", None) else [])
    choices = [resolve_attn_implementation(cfg.attn_implementation, path, device_type=device_type,
                                           needs_backward=needs_backward and k == 0,
                                           trust_remote_code=cfg.trust_remote_code) for k, path in enumerate(paths)]
    if cfg.attn_implementation == "auto" and len(set(choices)) > 1:
        choices = ["sdpa" if "eager" not in choices else "eager"]
    prepare_kernel(choices[0])
    return dataclasses.replace(cfg, attn_implementation=choices[0])


# torch.compile specialises FlexAttention per shape and grad mode (the probe's short rows, the no-grad reference, the
# policy's forward and backward): past dynamo's default of 8 variants it silently falls back to the unfused kernel,
# which materialises every [T x T] score (measured on an H200: 3.7x slower than sdpa at 2k-token pairs, out of
# memory at 16k). Enough room for every variant a run makes.
FLEX_RECOMPILE_LIMIT = 64


def prepare_kernel(implementation: str) -> None:
    """Process-wide settings an implementation needs before its first forward."""
    if implementation != "flex_attention":
        return
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            wanted = FLEX_RECOMPILE_LIMIT * (4 if name.startswith("accumulated") else 1)
            setattr(config, name, max(getattr(config, name), wanted))


def flex_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def implementation_of(model: torch.nn.Module) -> str:
    """The attention implementation a loaded model runs (under DeepSpeed, DDP or peft wrappers)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"
