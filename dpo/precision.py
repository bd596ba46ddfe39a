"""What the weights load as: the dtype of frozen weights, 4/8-bit quantisation of a LoRA base (QLoRA).

    frozen_weights_dtype(cfg)    # torch dtype of the LoRA base and of the frozen reference copy
    weights_label(cfg)           # "float32", "bfloat16", "nf4/bfloat16", "int8/float32": for fingerprints and logs
    quantization_config(cfg)     # transformers' BitsAndBytesConfig for --load_in_4bit/--load_in_8bit, else None

Trainable weights stay fp32: a full fine-tune's master weights (DeepSpeed keeps its own) and LoRA adapters (peft
keeps them in fp32 over a 16-bit base). Frozen weights follow `--torch_dtype`; `auto` takes the model config's
`torch_dtype` when mixed precision is on (the weights were trained and saved in it) and fp32 when it is off.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from dpo.config import ConfigError, TrainConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def config_dtype(model_path: str) -> torch.dtype | None:
    """The dtype a model folder's config.json records (`dtype`, or `torch_dtype` in older files), if any."""
    path = Path(model_path) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    return _CONFIG_DTYPES.get(str(config.get("dtype") or config.get("torch_dtype")))


def frozen_weights_dtype(cfg: TrainConfig, model_path: str | None = None) -> torch.dtype:
    """The dtype of weights that do not train: the LoRA base and the frozen reference copy."""
    if cfg.torch_dtype != "auto":
        return DTYPES[cfg.torch_dtype]
    if cfg.mixed_precision == "no":
        return torch.float32
    return config_dtype(model_path or cfg.model_path) or DTYPES[cfg.mixed_precision]


def weights_label(cfg: TrainConfig, model_path: str | None = None) -> str:
    """The reference weights' numeric format in words: the dtype, prefixed by the quantisation when there is one."""
    dtype = str(frozen_weights_dtype(cfg, model_path)).removeprefix("torch.")
    if cfg.load_in_4bit:
        return f"nf4/{dtype}"
    if cfg.load_in_8bit:
        return f"int8/{dtype}"
    return dtype


def quantization_config(cfg: TrainConfig) -> Any:
    """NF4 with double quantisation computing in the frozen dtype (QLoRA, Dettmers et al. 2023), or LLM.int8()."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError("load_in_4bit/load_in_8bit need bitsandbytes: pip install 'dpo-pipeline[qlora]' "
                          "(or pip install bitsandbytes)") from exc
    if cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=frozen_weights_dtype(cfg))


def keep_4bit_layers_differentiable(model: torch.nn.Module) -> int:
    """bitsandbytes' 4-bit layers repack their weights for a CPU kernel without a backward on their first forward in
    eval mode without gradients (what a reference or eval pass is); LoRA gradients through them are wrong after
    that. Turning the repacking off keeps every forward on the differentiable kernel. Returns the layers changed."""
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def check_quantized_run(cfg: TrainConfig, accelerator: Any) -> None:
    """Refuse what a quantised base cannot serve in this launch: ZeRO-3 partitions parameters, and bitsandbytes'
    packed 4/8-bit weights cannot be partitioned."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    stage = int(plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)) if plugin else 0
    if stage == 3:
        raise ConfigError(f"{'load_in_4bit' if cfg.load_in_4bit else 'load_in_8bit'}: DeepSpeed ZeRO-3 cannot "
                          f"partition bitsandbytes-quantised weights; use a ZeRO-1/2 or DDP config "
                          f"(accelerate_configs/zero2.yaml, ddp.yaml) or 16-bit weights (--torch_dtype bf16)")
