"""Attention masks for the rows the packed layouts build: who may see whom, for each kind of attention layer.

A packed row holds several sequences, and a prefix-shared row holds a prompt with two answer branches. Each
position is described by three [R, T] tensors the collate functions fill in:

    segment:      which sequence (packed) or pair (prefix shared) of the row the position belongs to; -1 padding
    branch:       SHARED for a plain sequence or a shared prompt, CHOSEN / REJECTED for the branches of a pair
    position_ids: the position inside its own sequence (what the model's positional encoding sees)

Query q may see key k when both are in the same segment, k is at or before q in the row, q is not a rejected-branch
token looking at a chosen-branch token, and the layer's own restriction holds *in sequence positions*: a sliding
window of W keeps keys with pos_q - pos_k < W, a chunk of C keeps keys with pos_q // C == pos_k // C (transformers'
`sliding_window_overlay` and `chunked_overlay`, applied to the positions the tokens have in their sequence rather
than in the row). Padding sees only itself, so no softmax row is empty.

transformers uses a 4D mask it is given as-is on every layer, window layers included, so windows must be in the
mask. Models with several kinds of layers (Gemma 2/3, GPT-OSS, Cohere2, OLMo 3, Llama 4 ...) take a mapping
{layer type: mask}; `AttentionSpec` says which form a model gets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Branch codes of each position.
PAD, SHARED, CHOSEN, REJECTED = -1, 0, 1, 2

# Layer types whose attention a mask fully describes.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention")
# Layer types known to mix tokens by their order in the row, ignoring masks and position ids: short convolutions
# (LFM2), linear attention and SSMs (Qwen3-Next, Bamba, GraniteMoeHybrid, Mamba), Griffin's recurrence, and
# "hybrid" layers that run a Mamba beside attention (Falcon-H1, Zamba). Names from transformers 5.25's configs.
RECURRENT_LAYER_TYPES = ("conv", "linear_attention", "mamba", "recurrent", "hybrid")
# Any other layer type (an indexed sparse attention, an MLP-only layer, whatever a new release adds) is unknown:
# it gets the plain causal mask in a mapping, and the probe decides whether a layout is exact on it.


@dataclass(frozen=True)
class MaskRule:
    """The restriction one kind of layer adds to causal attention (None: none)."""

    window: int | None = None  # sliding window: keys with pos_q - pos_k < window
    chunk: int | None = None  # chunked attention: keys with pos_q // chunk == pos_k // chunk

    def describe(self) -> str:
        if self.window is not None:
            return f"sliding window {self.window}"
        if self.chunk is not None:
            return f"chunks of {self.chunk}"
        return "full causal"


@dataclass(frozen=True)
class AttentionSpec:
    """How a model's layers restrict attention, as read from its config.

    rules:            (layer type, rule) for each distinct layer type; one entry ("", rule) for a model without
                      layer types, whose every layer gets the same mask
    recurrent_types:  layer types known not to be attention (short convolutions, linear attention, SSMs): no mask
                      can keep two sequences of one row apart in them
    unknown_types:    layer types in neither list: given the plain causal mask, neither assumed exact nor assumed
                      recurrent; only the probe on the model itself can say what they do
    """

    rules: tuple[tuple[str, MaskRule], ...] = (("", MaskRule()),)
    recurrent_types: tuple[str, ...] = ()
    unknown_types: tuple[str, ...] = ()

    @property
    def as_mapping(self) -> bool:
        """A mapping {layer type: mask} is needed when the layer types' rules differ; otherwise one mask serves
        every layer (a model that builds a mapping itself accepts one 4D mask for all of them)."""
        return len({rule for _, rule in self.rules}) > 1

    @property
    def longest_restriction(self) -> int:
        """The largest window or chunk of any layer (0 when attention is plain causal everywhere)."""
        return max([r.window or 0 for _, r in self.rules] + [r.chunk or 0 for _, r in self.rules])

    def describe(self) -> str:
        kinds = "; ".join(f"{name or 'all layers'}: {rule.describe()}" for name, rule in self.rules
                          if name not in self.recurrent_types and name not in self.unknown_types)
        if self.recurrent_types:
            kinds += f"; not attention: {', '.join(self.recurrent_types)}"
        if self.unknown_types:
            kinds += f"; unknown layer types (probed): {', '.join(self.unknown_types)}"
        return kinds.lstrip("; ")


def attention_spec(config: Any) -> AttentionSpec:
    """Read the attention restrictions of a transformers config (the text config of a multimodal one).

    Reads `layer_types` (or `layers_block_type`), `sliding_window` and `attention_chunk_size`. The spec only shapes
    the masks; whether a layout is exact is decided by the probe on the model itself (`dpo.layouts.probe_layouts`),
    with sequences as long as the data's longest whatever this reads, so a config this misreads (a window under
    another name, a layer type it does not know) leads to a fallback, never to wrong log-probs.
    """
    text = _text_config(config)
    window = getattr(text, "sliding_window", None)
    window = window if isinstance(window, int) and window > 0 else None
    chunk = getattr(text, "attention_chunk_size", None)
    chunk = chunk if isinstance(chunk, int) and chunk > 0 else None
    layer_types = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None)
    if not layer_types or isinstance(layer_types, str):
        return AttentionSpec(rules=(("", MaskRule(window=window)),))
    distinct = sorted({str(t) for t in layer_types})
    rules = tuple((t, MaskRule(window=window if t == "sliding_attention" else None,
                               chunk=chunk if t == "chunked_attention" else None)) for t in distinct)
    recurrent = tuple(t for t in distinct if t in RECURRENT_LAYER_TYPES)
    unknown = tuple(t for t in distinct if t not in RECURRENT_LAYER_TYPES and t not in ATTENTION_LAYER_TYPES)
    return AttentionSpec(rules=rules, recurrent_types=recurrent, unknown_types=unknown)


def _text_config(config: Any) -> Any:
    """The text config of a multimodal config; the config itself where that is ambiguous (several decoders)."""
    if not hasattr(config, "get_text_config"):
        return config
    try:
        return config.get_text_config()
    except ValueError:
        return config


def _allowed(segment: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor, rule: MaskRule
             ) -> torch.Tensor:
    """[R, T(q), T(k)] bool: what each query may attend to under `rule`."""
    t = segment.shape[1]
    index = torch.arange(t, device=segment.device)
    causal = index[None, :, None] >= index[None, None, :]
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    crosses = (branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN)
    allowed = causal & same & ~crosses
    if rule.window is not None:
        allowed &= (position_ids[:, :, None] - position_ids[:, None, :]) < rule.window
    if rule.chunk is not None:
        allowed &= (position_ids[:, :, None] // rule.chunk) == (position_ids[:, None, :] // rule.chunk)
    return allowed | torch.eye(t, dtype=torch.bool, device=segment.device)[None]


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] float32, 0 where allowed and -inf elsewhere: the form every attention implementation takes
    (eager adds it to the scores; sdpa takes a float mask too)."""
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))[:, None]


def build_attention_mask(segment: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor,
                         spec: AttentionSpec) -> torch.Tensor | dict[str, torch.Tensor]:
    """The mask of a batch for a model of `spec`: one [R, 1, T, T] additive mask, or {layer type: mask}."""
    masks: dict[MaskRule, torch.Tensor] = {}
    for _, rule in spec.rules:
        if rule not in masks:
            masks[rule] = _additive(_allowed(segment, branch, position_ids, rule))
    if not spec.as_mapping:
        return masks[spec.rules[0][1]]
    return {name: masks[rule] for name, rule in spec.rules}
