"""Tiny random causal LMs of many families, built from configs (no hub), for the tests across architectures.

Each entry is sized to run in milliseconds, with windows and chunks (8 tokens) shorter than the test sequences so
that they bite, and with weights re-drawn at std 0.2 so attention is sharp enough for a leak between sequences to
move log-probs by whole nats (at the default init of 0.02 every row looks alike and a leak hides in 1e-4).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedModel

WINDOW = 8  # sliding windows and attention chunks of the zoo's windowed models

_COMMON: dict[str, Any] = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               intermediate_size=64, max_position_embeddings=512, head_dim=8)
_GPT2_LIKE: dict[str, Any] = dict(n_embd=32, n_layer=2, n_head=4, n_positions=512)

# name -> (config class, overrides, keys of _COMMON the class does not take)
ZOO: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "llama": ("LlamaConfig", {}, ()),
    "qwen2": ("Qwen2Config", {}, ()),
    "qwen2_window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), ()),
    "qwen3": ("Qwen3Config", {}, ()),
    "mistral_window": ("MistralConfig", dict(sliding_window=WINDOW), ()),
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW), ()),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=WINDOW,
                                             layer_types=["sliding_attention", "full_attention"]), ()),
    "phi3_window": ("Phi3Config", dict(sliding_window=WINDOW), ()),
    "gpt2": ("GPT2Config", _GPT2_LIKE, tuple(_COMMON)),
    "gpt_neox": ("GPTNeoXConfig", {}, ()),
    "opt": ("OPTConfig", dict(ffn_dim=64, word_embed_proj_dim=32), ()),
    "bloom": ("BloomConfig", dict(n_layer=2, n_head=4), ()),
    "falcon_rotary": ("FalconConfig", dict(alibi=False, new_decoder_architecture=True, num_kv_heads=2),
                      ("head_dim", "num_key_value_heads")),
    "falcon_alibi": ("FalconConfig", dict(alibi=True), ("head_dim", "num_key_value_heads")),
    "mpt": ("MptConfig", dict(d_model=32, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512), ()),
    "gpt_oss": ("GptOssConfig", dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2), ()),
    "llama4_text": ("Llama4TextConfig", dict(attention_chunk_size=WINDOW, intermediate_size_mlp=64,
                                             num_local_experts=2, no_rope_layers=[1, 0],
                                             layer_types=["chunked_attention", "full_attention"]), ()),
    "olmo2": ("Olmo2Config", {}, ()),
    "olmo3": ("Olmo3Config", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), ()),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0]), ()),  # layer 2 has no rotary embedding (NoPE)
    "cohere2": ("Cohere2Config", dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
                ()),
    "starcoder2": ("Starcoder2Config", dict(sliding_window=WINDOW), ()),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4), ()),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, moe_intermediate_size=32, num_experts_per_tok=2), ()),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, n_routed_experts=4, moe_intermediate_size=32,
                                             num_experts_per_tok=2, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                             first_k_dense_replace=1, n_group=1, topk_group=1), ()),
    "lfm2": ("Lfm2Config", dict(layer_types=["conv", "full_attention"], block_ff_dim=64), ()),
    "qwen3_next": ("Qwen3NextConfig", dict(layer_types=["linear_attention", "full_attention"],
                                           linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8,
                                           linear_value_head_dim=8, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32, shared_expert_intermediate_size=32), ()),
    "granitemoehybrid": ("GraniteMoeHybridConfig", dict(layer_types=["mamba", "attention"], mamba_n_heads=4,
                                                        mamba_d_head=16, mamba_d_state=16, num_local_experts=4,
                                                        shared_intermediate_size=64), ()),
    "gpt_bigcode": ("GPTBigCodeConfig", _GPT2_LIKE, tuple(_COMMON)),
    "xglm": ("XGLMConfig", dict(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64), ()),
}

# Dropout settings (as the families name them) that a real checkpoint may carry; `build_config(dropout=True)` sets
# them, so the tests see dropout in every place a family keeps it.
_DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                 "hidden_dropout", "layerdrop", "attn_dropout", "resid_dropout", "embd_dropout", "ffn_dropout")


def build_config(name: str, *, vocab_size: int, pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2,
                 dropout: bool = False) -> transformers.PretrainedConfig:
    cls_name, overrides, dropped = ZOO[name]
    kwargs = {k: v for k, v in _COMMON.items() if k not in dropped}
    kwargs.update(overrides)
    kwargs.update(vocab_size=vocab_size, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, tie_word_embeddings=False)
    config = getattr(transformers, cls_name)(**kwargs)
    if dropout:
        for key in _DROPOUT_KEYS:
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.3)
    return config


def build(name: str, *, vocab_size: int = 97, seed: int = 0, dropout: bool = False, head_dim: int | None = None,
          **ids: int) -> PreTrainedModel:
    """A tiny random model of family `name`, fp32, eval mode, matrices re-drawn at std 0.2 (see module doc).
    `head_dim` widens the heads (GPU FlexAttention kernels need at least 16)."""
    config = build_config(name, vocab_size=vocab_size, dropout=dropout, **ids)
    if head_dim is not None:
        config.head_dim = head_dim
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for param in model.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, 0.2)
    return model.float().eval()
