"""Attention masks for the rows the packed layouts build: who may see whom, for each kind of attention layer.

A packed row holds several sequences, and a prefix-shared row holds a prompt with two answer branches. Each
position is described by three [R, T] tensors the collate functions fill in:

    segment:      which sequence (packed) or pair (prefix shared) of the row the position belongs to; -1 padding
    branch:       SHARED for a plain sequence or a shared prompt, CHOSEN / REJECTED for the branches of a pair
                  (1 + a for answer a of a prompt with k answers: CHOSEN and REJECTED are its k = 2 case)
    position_ids: the position inside its own sequence (what the model's positional encoding sees)

Query q may see key k when both are in the same segment, k is at or before q in the row, k is shared or in q's own
branch (a rejected-branch token never sees a chosen-branch one; no answer branch sees another), and the layer's own
restriction holds *in sequence positions*: a sliding window of W keeps keys with pos_q - pos_k < W, a chunk of C
keeps keys with pos_q // C == pos_k // C (transformers'
`sliding_window_overlay` and `chunked_overlay`, applied to the positions the tokens have in their sequence rather
than in the row). Padding sees only itself, so no softmax row is empty.

transformers uses a 4D mask it is given as-is on every layer, window layers included, so windows must be in the
mask. Models with several kinds of layers (Gemma 2/3, GPT-OSS, Cohere2, OLMo 3, Llama 4 ...) take a mapping
{layer type: mask}; `AttentionSpec` says which form a model gets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.attention.flex_attention import create_block_mask

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


def _rule_allows(q: tuple[torch.Tensor, ...], k: tuple[torch.Tensor, ...], rule: MaskRule) -> torch.Tensor:
    """Whether query q may see key k, elementwise over broadcastable (segment, branch, position, row index) of
    each side: the one statement of the rules, for the dense masks (whole [T x T] grids) and the block masks
    (FlexAttention calls it with index tensors inside its kernels) alike. Padding sees only itself."""
    q_segment, q_branch, q_position, q_index = q
    k_segment, k_branch, k_position, k_index = k
    allowed = (q_index >= k_index) & (q_segment == k_segment) & (q_segment >= 0)
    # A branch token sees the shared prompt and its own branch only: the rejected branch never sees the chosen one,
    # and of k answer branches (dpo.ranked_batch, codes 1..k) none sees another.
    allowed = allowed & ((k_branch == SHARED) | (k_branch == q_branch))
    if rule.window is not None:
        allowed = allowed & ((q_position - k_position) < rule.window)
    if rule.chunk is not None:
        allowed = allowed & ((q_position // rule.chunk) == (k_position // rule.chunk))
    return allowed | (q_index == k_index)


def _allowed(segment: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor, rule: MaskRule
             ) -> torch.Tensor:
    """[R, T(q), T(k)] bool: what each query may attend to under `rule`."""
    index = torch.arange(segment.shape[1], device=segment.device)[None]
    q = (segment[:, :, None], branch[:, :, None], position_ids[:, :, None], index[:, :, None])
    k = (segment[:, None, :], branch[:, None, :], position_ids[:, None, :], index[:, None, :])
    return _rule_allows(q, k, rule)


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """[R, 1, T, T] float32, 0 where allowed and -inf elsewhere: the form every attention implementation takes
    (eager adds it to the scores; sdpa takes a float mask too)."""
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))[:, None]


MASK_FORMS = ("dense", "block", "varlen")
BLOCK_SIZE = 128  # FlexAttention's default block: a BlockMask stores about (T / 128)^2 entries per row
COMPILE_BLOCK_MASKS_FROM = 4096  # tokens per row past which a CPU builds block masks compiled too


def build_attention_mask(segment: torch.Tensor, branch: torch.Tensor, position_ids: torch.Tensor,
                         spec: AttentionSpec, *, form: str = "dense"
                         ) -> torch.Tensor | dict[str, torch.Tensor] | SegmentMask | None:
    """The mask of a batch for a model of `spec`, in the form its attention kernel takes (`dpo.attention`):

    dense:  one [R, 1, T, T] additive mask, or {layer type: mask} (eager, sdpa)
    block:  a SegmentMask, turned into FlexAttention BlockMasks on the device at the forward; no [T x T] tensor
    varlen: None; the position ids alone mark where packed sequences start (FlashAttention's varlen path)
    """
    if form == "block":
        return SegmentMask(segment=segment, branch=branch, position_ids=position_ids, spec=spec)
    if form == "varlen":
        return None
    if form != "dense":
        raise ValueError(f"mask form {form!r}: expected one of {', '.join(MASK_FORMS)}")
    masks: dict[MaskRule, torch.Tensor] = {}
    for _, rule in spec.rules:
        if rule not in masks:
            masks[rule] = _additive(_allowed(segment, branch, position_ids, rule))
    if not spec.as_mapping:
        return masks[spec.rules[0][1]]
    return {name: masks[rule] for name, rule in spec.rules}


@dataclass(eq=False)
class SegmentMask:
    """A batch's mask in block-sparse form: the three [R, T] tensors of the rows and the model's layer rules.

    `block_masks()` builds one FlexAttention BlockMask per distinct rule (a mapping {layer type: BlockMask} when
    rules differ, like the dense form) whose mask_mod is `_rule_allows`, the dense masks' own rule. Built where
    the tensors are, so a batch moved to the GPU builds its masks there (compiled, never materialising [T x T]);
    built once and reused by every forward of the batch (policy and reference)."""

    segment: torch.Tensor
    branch: torch.Tensor
    position_ids: torch.Tensor
    spec: AttentionSpec
    _built: Any = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        rows, width = self.segment.shape
        return rows, 1, width, width

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "SegmentMask":
        return SegmentMask(*(t.to(device, non_blocking=non_blocking)
                             for t in (self.segment, self.branch, self.position_ids)), spec=self.spec)

    def block_masks(self, *, mask_mod: Callable[..., Any] | None = None) -> Any:
        """BlockMask, or {layer type: BlockMask}. `mask_mod` replaces the rules (tests' negative controls only)."""
        if self._built is not None and mask_mod is None:
            return self._built
        rows, width = self.segment.shape
        # Padded to whole blocks: kernels may evaluate the mask_mod on indices past T in the last block.
        padded = -(-width // BLOCK_SIZE) * BLOCK_SIZE
        extra = padded - width
        segment = torch.nn.functional.pad(self.segment, (0, extra), value=-1)
        branch = torch.nn.functional.pad(self.branch, (0, extra), value=PAD)
        position = torch.nn.functional.pad(self.position_ids, (0, extra), value=0)
        device = self.segment.device

        def rule_mod(rule: MaskRule) -> Callable[..., torch.Tensor]:
            def allows(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
                q = (segment[b, q_idx], branch[b, q_idx], position[b, q_idx], q_idx)
                k = (segment[b, kv_idx], branch[b, kv_idx], position[b, kv_idx], kv_idx)
                return _rule_allows(q, k, rule)
            return allows

        built: dict[MaskRule, Any] = {}
        for _, rule in self.spec.rules:
            if rule not in built:
                # Compiled, the block tables are computed block by block; uncompiled (cheap to start, fine for
                # the short rows of CPU probes) the mask_mod is evaluated on the whole [T x T] grid at once.
                built[rule] = create_block_mask(mask_mod or rule_mod(rule), B=rows, H=None, Q_LEN=width,
                                                KV_LEN=width, device=device, BLOCK_SIZE=BLOCK_SIZE,
                                                _compile=device.type == "cuda" or width > COMPILE_BLOCK_MASKS_FROM)
        result = (built[self.spec.rules[0][1]] if not self.spec.as_mapping
                  else {name: built[rule] for name, rule in self.spec.rules})
        if mask_mod is None:
            self._built = result
        return result


def model_attention_mask(mask: Any) -> Any:
    """What the model's forward takes as `attention_mask`: a SegmentMask becomes its BlockMasks; the rest as is."""
    return mask.block_masks() if isinstance(mask, SegmentMask) else mask


def mask_bytes(mask: Any) -> int:
    """Bytes a batch's attention mask holds: dense tensors, mappings of them (a tensor shared by several layer types
    counted once), or a SegmentMask's three [R, T] tensors plus its BlockMasks' block tables and indices."""
    seen: dict[int, int] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            seen[id(value)] = value.numel() * value.element_size()
        elif isinstance(value, SegmentMask):
            visit((value.segment, value.branch, value.position_ids))
            visit(value.block_masks())
        elif isinstance(value, dict):
            visit(list(value.values()))
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif hasattr(value, "as_tuple"):  # a BlockMask: its kv/q block counts and indices
            visit(value.as_tuple())

    visit(mask)
    return sum(seen.values())
