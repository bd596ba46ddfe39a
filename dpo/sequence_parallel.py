"""Sequence parallelism (Ulysses): each row's tokens split across a group of N processes.

    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 8 -m dpo.train \\
        --config recipe.yaml --sequence_parallel_size 4

The collate builds the full rows as in a 1-process run (masks, positions, labels shifted on the full row);
`shard` pads them to a multiple of N tokens and keeps this rank's 1/N slice of the tokens and the FULL mask. In every
attention layer, `install`'s wrapper around the model's own attention function (sdpa or the model's eager) swaps
[B, H, T/N, D] query/key/value for [B, H/N, T, D] with DeepSpeed's differentiable all-to-all, runs the model's own
attention over the whole row with the full row's mask for its share of the heads, and swaps back
(sdpa, eager, flex_attention; `dpo.layouts.check_split_rows` checks the split on the model before training). The LM head
scores each rank's own answer positions; per-sequence sums are added over the group (`sum_over_group`).

Why not DeepSpeed's `UlyssesSPAttentionHF` (what accelerate's `ParallelismConfig(sp_backend="deepspeed")`
registers): its wrapper drops every tensor attention mask (`attention_mask = None`, relying on position ids and
`is_causal`), refuses eager, and rebuilds a FlexAttention mask as plain causal. Packed rows, prefix-shared rows
(a rejected branch must not see the chosen one) and sliding windows all live in our masks, so its output would be
silently wrong for every layout but one right-padded sequence per row (tests/test_sequence_parallel.py shows the
drop). The adapter here uses DeepSpeed's own all-to-all operator and changes nothing else of the engine.

Gradients. Every rank of a group computes the same loss from the group-summed log-probs. `sum_over_group` is an
all-reduce whose backward is again an all-reduce sum, so each rank's share of the log-probs receives N times the
loss gradient; DeepSpeed and DDP average gradients over all P = D x N processes, which divides it by N again: the
update equals the 1-process one (the 2-process test checks it step by step).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from transformers import AutoConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from dpo.distributed import deepspeed_all_to_all
from dpo.errors import UserError
from dpo.masks import PAD, SHARED, AttentionSpec, SegmentMask, attention_spec, build_attention_mask

SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class SequenceGroup:
    """This process's place: `size` consecutive ranks share each row; `rank` is the place in the group; data
    parallelism runs over `data_size` groups, of which this process is in number `data_rank`."""

    size: int
    rank: int
    data_rank: int
    data_size: int
    group: Any = None  # the torch ProcessGroup of the `size` ranks

    @property
    def leads(self) -> bool:
        """The group's first rank: the one that counts the pairs in metrics."""
        return self.rank == 0


# ------------------------------------------------------------------------------------------- refusals


def check_run(cfg: Any, model_config: Any, *, num_processes: int, implementation: str) -> None:
    """One-line refusals (UserError), before anything is written, of what cannot run split by N or is not
    supported yet."""
    n = cfg.sequence_parallel_size
    if n == 1:
        return
    if num_processes % n:
        raise UserError(f"sequence_parallel_size {n} does not divide the {num_processes} processes of this launch")
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if not heads or heads % n or kv_heads % n:
        raise UserError(f"sequence_parallel_size {n}: the model has {heads} attention heads and {kv_heads} key/value "
                        f"heads; both must be divisible by {n} (each rank attends with a 1/{n} share of the heads)")
    recurrent = attention_spec(model_config).recurrent_types
    if recurrent:
        raise UserError(f"sequence_parallel_size {n}: layers of type {', '.join(recurrent)} mix a row's tokens in "
                        f"order outside attention, and each rank holds only 1/{n} of them")
    if implementation not in SUPPORTED_IMPLEMENTATIONS:
        raise UserError(f"sequence_parallel_size {n}: attn_implementation {implementation} cannot run split yet "
                        f"(supported: {', '.join(SUPPORTED_IMPLEMENTATIONS)}); use --attn_implementation sdpa")
    unsupported = {
        "layout single": cfg.layout == "single",
        "use_weighting (WPO needs every token's log-prob of a sequence on one rank)": cfg.use_weighting,
        "ld_alpha (LD-DPO needs every token's log-prob of a sequence on one rank)": cfg.ld_alpha is not None,
    }
    for what, present in unsupported.items():
        if present:
            raise UserError(f"sequence_parallel_size {n} with {what} is not supported yet")


def splittable_request(cfg: Any) -> Any:
    """`cfg` with `attn_implementation auto` narrowed to sdpa when rows are split: auto would pick FlexAttention on
    CUDA, whose split forward is checked on the CPU only (no FlexAttention backward there), so the default stays on
    the path trained end to end; an explicit flex_attention is taken, for `check_run` to judge."""
    if cfg.sequence_parallel_size > 1 and cfg.attn_implementation == "auto":
        return dataclasses.replace(cfg, attn_implementation="sdpa")
    return cfg


def check_models(cfg: Any, *, num_processes: int) -> None:
    """`check_run` for the policy and a frozen reference from another folder, read from their config files."""
    if cfg.sequence_parallel_size == 1:
        return
    for path in [cfg.model_path] + ([cfg.ref_model_path] if cfg.ref_model_path else []):
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        check_run(cfg, config, num_processes=num_processes, implementation=cfg.attn_implementation)


# ------------------------------------------------------------------------------------------- groups


def setup(size: int) -> SequenceGroup | None:
    """The groups of `size` consecutive ranks (consecutive: on one node, where the all-to-alls are cheap). Every
    process creates every group (torch's rule for `new_group`). None when `size` is 1."""
    if size == 1:
        return None
    deepspeed_all_to_all()  # DeepSpeed's communication up before any group exists
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            mine = group
    return SequenceGroup(size=size, rank=rank % size, data_rank=rank // size, data_size=world // size, group=mine)


def data_parallel(group: SequenceGroup | None, *, num_processes: int, process_index: int) -> tuple[int, int]:
    """(data-parallel degree, this process's data rank): every rank of a sequence group reads the same batches."""
    if group is None:
        return num_processes, process_index
    return group.data_size, group.data_rank


def counted(batch: Any) -> tuple[torch.Tensor, int]:
    """(pair weights, useful tokens) a rank adds to the step's metrics: each pair once per group, on its lead."""
    group = batch.sequence_group
    if group is None or group.leads:
        return batch.pair_weight, batch.num_tokens
    return torch.zeros_like(batch.pair_weight), 0


# ------------------------------------------------------------------------------------------- the split


def _full_mask(batch: Any, spec: AttentionSpec, form: str) -> Any:
    """The padded layout's [R, T] padding mask as the masks of `dpo.masks` in `form` (one sequence per row, the
    model's windows and layer types): split, the model sees only its slice of tokens and cannot build them."""
    mask = batch.attention_mask
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return mask
    real = mask != 0
    segment = torch.where(real, 0, -1)
    return build_attention_mask(segment, torch.where(real, SHARED, PAD), batch.position_ids, spec, form=form)


def _pad_square(mask: torch.Tensor, extra: int) -> torch.Tensor:
    """[R, 1, T, T] additive mask -> [R, 1, T + extra, T + extra]; each new position sees only itself."""
    width = mask.shape[-1] + extra
    out = torch.nn.functional.pad(mask, (0, extra, 0, extra), value=float("-inf"))
    index = torch.arange(mask.shape[-1], width, device=mask.device)
    out[..., index, index] = 0.0
    assert out.shape[-1] == width
    return out


def shard(batch: Any, group: SequenceGroup, spec: AttentionSpec, *, mask_form: str = "dense") -> Any:
    """This rank's slice of a full-row batch: rows right-padded to a multiple of N (padding continues the positions,
    sees only itself, is never scored), then tokens, positions, labels and scored positions cut to columns
    [rank * T/N, (rank + 1) * T/N). The mask stays whole (each rank attends over the whole row for its heads).
    Labels were shifted on the full row by the collate: the label of a slice's last token is the next slice's first
    token, and stays with this slice. `mask_form`: what the padded layout's mask becomes (`dpo.attention.mask_form`;
    FlexAttention's "block"); the packed layouts' masks are already in their form."""
    if batch.alone:
        raise UserError("sequence parallelism cannot split the one-sequence-per-forward layout (layout single)")
    mask = _full_mask(batch, spec, mask_form)
    rows, width = batch.input_ids.shape
    extra = -width % group.size
    if extra:
        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, extra), value=value)

        last = batch.position_ids[:, -1:]
        position_ids = torch.cat([batch.position_ids, last + torch.arange(1, extra + 1, device=last.device)], dim=1)
        shared: dict[int, torch.Tensor] = {}  # a tensor used by several layer types is padded once
        if isinstance(mask, SegmentMask):  # FlexAttention's block form: the rule's inputs, padded like the tokens
            mask = SegmentMask(segment=pad(mask.segment, -1), branch=pad(mask.branch, PAD), position_ids=position_ids,
                               spec=mask.spec)
        elif isinstance(mask, dict):
            mask = {k: shared.setdefault(id(v), _pad_square(v, extra)) for k, v in mask.items()}
        else:
            mask = _pad_square(mask, extra)
        batch = replace(batch, input_ids=pad(batch.input_ids, 0), position_ids=position_ids,
                        target_ids=pad(batch.target_ids, 0), target_seq=pad(batch.target_seq, -1))
    local = (width + extra) // group.size
    cols = slice(group.rank * local, (group.rank + 1) * local)
    return replace(batch, input_ids=batch.input_ids[:, cols].contiguous(),
                   position_ids=batch.position_ids[:, cols].contiguous(), attention_mask=mask,
                   target_ids=batch.target_ids[:, cols].contiguous(), target_seq=batch.target_seq[:, cols].contiguous(),
                   sequence_group=group)


class _GroupSum(torch.autograd.Function):
    """All-reduce (sum) over a process group; its backward is the same all-reduce of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = value.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def sum_over_group(value: torch.Tensor, group: SequenceGroup | None) -> torch.Tensor:
    """`value` summed over the ranks of the sequence group, differentiably. Backward sums the gradient over the
    group too: each rank's loss is the same function of the sums, so each share receives N x dL/dsum, and the
    data-parallel average over all P = D x N processes divides by N again (module docstring)."""
    if group is None:
        return value
    return _GroupSum.apply(value, group.group)


def splitting(collate: Callable[..., Any], group: SequenceGroup | None, spec: AttentionSpec, *,
              mask_form: str = "dense") -> Callable[..., Any]:
    """`collate` followed by `shard`: the full rows built as in a 1-process run, this rank's slice kept."""
    if group is None:
        return collate
    return lambda pairs, weights=None: shard(collate(pairs, weights), group, spec, mask_form=mask_form)


# ------------------------------------------------------------------------------------------- attention


def _swap(x: torch.Tensor, group: SequenceGroup, all_to_all: Callable[..., torch.Tensor]) -> torch.Tensor:
    """[B, H, t, D] (this rank's t = T/N tokens, all heads) -> [B, H/N, T, D] (all tokens, this rank's heads)."""
    b, h, t, d = x.shape
    n = group.size
    x = x.reshape(b, n, h // n, t, d).permute(1, 0, 2, 3, 4)  # [N (head share), B, H/N, t, D]
    x = all_to_all(group.group, x.contiguous())  # now [N (token slice), B, H/N, t, D]
    return x.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * t, d)


def _swap_back(out: torch.Tensor, group: SequenceGroup, all_to_all: Callable[..., torch.Tensor]) -> torch.Tensor:
    """The attention output [B, T, H/N, D] (transformers' layout) -> [B, t, H, D]."""
    b, full, h_local, d = out.shape
    n = group.size
    out = out.reshape(b, n, full // n, h_local, d).permute(1, 0, 2, 3, 4)  # [N (token slice), B, t, H/N, D]
    out = all_to_all(group.group, out.contiguous())  # now [N (head share), B, t, H/N, D]
    return out.permute(1, 2, 0, 3, 4).reshape(b, full // n, n * h_local, d)


def split_attention(inner: Callable[..., Any] | None, group: SequenceGroup,
                    all_to_all: Callable[..., torch.Tensor]) -> Callable[..., Any]:
    """An attention function for transformers' interface: all-to-all in, `inner` (the model's own; None: the
    eager function of the calling module's model file) over the whole row with the full mask, all-to-all out."""

    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        run = inner if inner is not None else sys.modules[type(module).__module__].eager_attention_forward
        q, k, v = (_swap(x, group, all_to_all) for x in (query, key, value))
        out, _ = run(module, q, k, v, attention_mask, **kwargs)
        return _swap_back(out, group, all_to_all), None

    return attention


def install(group: SequenceGroup, implementation: str) -> Callable[[], None]:
    """From now on every `implementation` attention of this process runs split (after the layout probe, which
    runs whole rows). For the whole process, not a context: gradient checkpointing recomputes attention in
    backward. Returns the function that restores the original (tests)."""
    all_to_all = deepspeed_all_to_all()
    registry = ALL_ATTENTION_FUNCTIONS._local_mapping
    had, before = implementation in registry, registry.get(implementation)
    inner = None if implementation == "eager" else ALL_ATTENTION_FUNCTIONS[implementation]
    ALL_ATTENTION_FUNCTIONS[implementation] = split_attention(inner, group, all_to_all)

    def restore() -> None:
        if had:
            registry[implementation] = before
        else:
            registry.pop(implementation, None)

    return restore
