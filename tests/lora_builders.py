"""A non-trivial SFT LoRA adapter on a tiny model, built locally for the LoRA and reference tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from dpo.models import load_causal_lm


def make_sft_adapter(model_dir: str | Path, out: Path, *, seed: int = 0, scale: float = 0.2) -> Path:
    """A LoRA adapter on q/v/up projections whose A and B are random (a fresh adapter's B is zero, which would make
    base + adapter equal to the base and hide any mistake about which one is the reference)."""
    model = load_causal_lm(str(model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out))
    return out
