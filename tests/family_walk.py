"""Tiny random models of every causal-LM family transformers ships, built from its config classes (no downloads).

`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` lists the families; each config class is built with every size field it has
shrunk (hidden 32, 2 layers, 4 heads, 4 experts ...), windows and chunks of 8 tokens (shorter than the test's
sequences, so they bite), each distinct layer type kept once, special ids inside the vocabulary, and the weights
re-drawn at std 0.2 (see tests/model_zoo.py). A family that cannot be built that way raises `Unbuildable` with the
reason, which the test records as its skip reason.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

VOCAB = 97
WINDOW = 8
MAX_PARAMETERS = 3_000_000  # a default left large by a field this does not know: skipped, not run for minutes

FAMILIES = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)

# Size fields, as the families name them -> tiny values.
_SIZES: dict[str, Any] = dict(
    hidden_size=32, n_embd=32, d_model=32, dim=32, embed_dim=32, word_embed_proj_dim=32, model_dim=32,
    num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2, num_decoder_layers=2, decoder_layers=2,
    num_attention_heads=4, n_head=4, n_heads=4, attention_heads=4, decoder_attention_heads=4, num_heads=4,
    num_key_value_heads=2, num_kv_heads=2, n_kv_heads=2, multi_query_group_num=2,
    intermediate_size=64, ffn_dim=64, n_inner=64, decoder_ffn_dim=64, ffn_hidden_size=64, inner_hidden_size=64,
    block_ff_dim=64, intermediate_size_mlp=64, shared_intermediate_size=64, expansion_ratio=2,
    head_dim=8, kv_channels=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_topk=2, top_k=2, n_shared_experts=1, num_shared_experts=1, n_group=1, topk_group=1,
    q_lora_rank=16, kv_lora_rank=16, index_n_heads=2, index_head_dim=8, index_topk=4,
    linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
    mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16, mamba_headdim=16, state_size=16, d_state=16,
    mamba_expand=2, time_step_rank=8, conv_L_cache=3, mamba_d_conv=4, conv_kernel=4,
    max_position_embeddings=256, n_positions=256, max_seq_len=256, seq_length=256, max_sequence_length=256,
    sliding_window=WINDOW, attention_chunk_size=WINDOW, first_k_dense_replace=1, vocab_size=VOCAB, chunk_size=16,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)


_RANDOM_RATE = re.compile(r"dropout|pdrop|layerdrop|drop_path|jitter")


class Unbuildable(Exception):
    """The family cannot be built tiny on a CPU from its config class; the message says why."""


def _distinct_layer_types(values: list[Any]) -> list[Any]:
    seen: list[Any] = []
    for value in values:
        if value not in seen:
            seen.append(value)
    return seen


def tiny_kwargs(config: PretrainedConfig, *, dropout: bool = False) -> dict[str, Any]:
    """Constructor arguments that shrink `config` (a default instance of the class), sub-configs included;
    `dropout`: every dropout-like rate the config has (dropout, layer drop, drop path, router jitter) at 0.1, as a
    real checkpoint may carry them."""
    kwargs: dict[str, Any] = {}
    for key, value in vars(config).items():
        if isinstance(value, PretrainedConfig):
            kwargs[key] = type(value)(**tiny_kwargs(value, dropout=dropout)).to_dict()
        elif key in _SIZES and (value is None or isinstance(value, (int, float, bool))):
            kwargs[key] = _SIZES[key]
        elif dropout and type(value) is float and _RANDOM_RATE.search(key):
            kwargs[key] = 0.1
    for key in ("layer_types", "layers_block_type"):
        types = getattr(config, key, None)
        if isinstance(getattr(type(config), key, None), property):  # derived from other fields: not an argument
            continue
        if isinstance(types, (list, tuple)) and types:
            distinct = _distinct_layer_types(list(types))
            kwargs[key] = distinct if len(distinct) >= 2 else distinct * 2
            layers = len(kwargs[key])
            for name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
                if name in kwargs:
                    kwargs[name] = layers
    return kwargs


def build_family(model_type: str, *, seed: int = 0, dropout: bool = False) -> PreTrainedModel:
    """A tiny random fp32 model of `model_type` in eval mode (dropout rates configured: see tiny_kwargs), or
    Unbuildable."""
    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
        config = config_class(**tiny_kwargs(default, dropout=dropout))
    except Exception as exc:
        raise Unbuildable(f"config: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
            if sum(p.numel() for p in model.parameters()) > MAX_PARAMETERS:
                raise Unbuildable(f"not tiny: {sum(p.numel() for p in model.parameters()):,} parameters at the "
                                  f"shrunk config (a size field this does not know)")
            with torch.no_grad():
                for param in model.parameters():
                    if param.ndim >= 2 and param.is_floating_point():
                        param.normal_(0.0, 0.2)
    except Unbuildable:
        raise
    except Exception as exc:
        raise Unbuildable(f"model: {type(exc).__name__}: {_first_line(exc)}") from None
    return model.float().eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else ""
