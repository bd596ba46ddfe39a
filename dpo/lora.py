"""A trained LoRA adapter back on its base: reload it, or merge it into a standalone model.

    policy = load_trained_adapter(cfg, "runs/lora/final")        # PeftModel on base (+ SFT adapter) weights
    merge_adapter_into_base(cfg, "runs/lora/final", "runs/lora/final_merged", tokenizer)

The adapter in `final/` was trained on top of `model_path` with `lora_adapter_path` (the SFT adapter) already
merged in, so it must be applied to that same merged base: applying it to the bare `model_path` would give another
model. Both functions rebuild that base with `dpo.models.load_base_model`, the function training used.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from dpo.atomic import staged_folder
from dpo.config import TrainConfig
from dpo.models import load_base_model


def load_trained_adapter(cfg: TrainConfig, adapter_dir: str | Path, *, dequantize: bool = False) -> PeftModel:
    """The trained adapter on the base it was trained on (`model_path` + SFT adapter merged, in the frozen dtype and
    quantised as in training), in eval mode. `dequantize`: a quantised base becomes plain layers holding exactly the
    dequantised weights training computed with."""
    base = load_base_model(cfg.model_path, adapter_path=cfg.lora_adapter_path, cfg=cfg, frozen=True)
    if dequantize and (cfg.load_in_4bit or cfg.load_in_8bit):
        base = base.dequantize()
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def merge_adapter_into_base(cfg: TrainConfig, adapter_dir: str | Path, merged_dir: str | Path,
                            tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Write base + SFT adapter + trained adapter as one model (safetensors and tokenizer) to `merged_dir`,
    loadable with `AutoModelForCausalLM.from_pretrained`. The folder appears only once complete. A quantised base
    is dequantised first, so the merged model is in the frozen dtype (16-bit with --torch_dtype bf16/fp16)."""
    merged = load_trained_adapter(cfg, adapter_dir, dequantize=True).merge_and_unload()
    with staged_folder(Path(merged_dir)) as staging:
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
    return merged
