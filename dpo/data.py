"""Training data: load data_prep's Arrow shards, split them across processes, and collate pairs into batches.

Every layout produces the same `PreferenceBatch` contract, so log-prob code never needs to know the layout:
`target_seq[r, t]` says which sequence the prediction at row r, position t scores (chosen of pair i is
sequence i, rejected of pair i is sequence B + i; -1: not scored) and `target_ids[r, t]` is the token it must
predict. Per-sequence log-probs are then a scatter-add over positions, whatever the packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from dpo.contract import REF_COLUMNS, TOKEN_COLUMNS
from dpo.masks import PAD, SHARED, AttentionSpec, SegmentMask, build_attention_mask


@dataclass
class PreferenceBatch:
    """One micro-batch of B preference pairs in some layout of R rows of T tokens.

    input_ids:      [R, T] long, pad positions hold the pad id
    position_ids:   [R, T] long, restart at 0 for each packed sequence
    attention_mask: [R, T] long (padded layout), or for the packed layouts an [R, 1, T, T] float additive mask,
                    or a mapping {layer type: such a mask} for models with several kinds of attention layers,
                    or its block-sparse form (a SegmentMask, for FlexAttention), or None (FlashAttention's
                    varlen path: the position ids mark the sequences) (`dpo.masks`)
    target_ids:     [R, T] long, the token predicted at each position (0 where unscored)
    target_seq:     [R, T] long, sequence index in [0, 2B) of each scored prediction, -1 elsewhere
    pair_weight:    [B] float, 1 for real pairs, 0 for pairs that only pad the last eval batch
    num_tokens:     tokens of prompt+chosen plus prompt+rejected over real pairs, whatever the layout
                    (the "useful tokens" of tokens_per_second, so layouts compare fairly)
    ref_chosen_logps / ref_rejected_logps: [B] float, precomputed reference log-probs when the data has them
    alone:          each row runs as its own forward, cut to its real tokens (no padding, no mask): the layout of
                    last resort for a model that no batched layout serves exactly (`dpo.layouts.SINGLE`)
    sequence_group: set on this rank's slice of a row split by sequence parallelism (`dpo.sequence_parallel`);
                    the tensors above are the slice's columns, the attention mask the full row's
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | dict[str, torch.Tensor] | SegmentMask | None
    target_ids: torch.Tensor
    target_seq: torch.Tensor
    pair_weight: torch.Tensor
    num_pairs: int
    num_tokens: int
    ref_chosen_logps: torch.Tensor | None = None
    ref_rejected_logps: torch.Tensor | None = None
    alone: bool = False
    sequence_group: Any = None

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        def move(t: Any) -> Any:
            if isinstance(t, dict):
                return {k: move(v) for k, v in t.items()}
            return None if t is None else t.to(device, non_blocking=True)

        return PreferenceBatch(
            input_ids=move(self.input_ids),
            position_ids=move(self.position_ids),
            attention_mask=move(self.attention_mask),
            target_ids=move(self.target_ids),
            target_seq=move(self.target_seq),
            pair_weight=move(self.pair_weight),
            num_pairs=self.num_pairs,
            num_tokens=self.num_tokens,
            ref_chosen_logps=move(self.ref_chosen_logps),
            ref_rejected_logps=move(self.ref_rejected_logps),
            alone=self.alone,
            sequence_group=self.sequence_group,
        )


# ------------------------------------------------------------------------------------------------ loading


def load_split(data_path: str | Path, split: str) -> datasets.Dataset | None:
    """`data_path/split` as a Dataset, or None when the split does not exist."""
    path = Path(data_path) / split
    if not path.exists():
        return None
    dataset = datasets.load_from_disk(str(path))
    missing = [c for c in TOKEN_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; expected {list(TOKEN_COLUMNS)} (run data_prep)")
    if len(dataset) == 0:
        raise ValueError(f"{path}: holds no pairs")
    return dataset


def has_ref_columns(dataset: datasets.Dataset) -> bool:
    return all(c in dataset.column_names for c in REF_COLUMNS)


# ---------------------------------------------------------------------------------- splitting the work


def epoch_order(num_pairs: int, *, seed: int, epoch: int) -> list[int]:
    """A seeded permutation of the pairs, different each epoch, identical on every process."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_pairs, generator=generator).tolist()


def optimizer_steps_per_epoch(num_pairs: int, *, batch_size: int, num_processes: int, accumulation: int) -> int:
    return num_pairs // (batch_size * num_processes * accumulation)


def train_micro_batches(
    num_pairs: int, *, batch_size: int, num_processes: int, process_index: int, accumulation: int, seed: int,
    epoch: int,
) -> list[list[int]]:
    """This process's micro-batches of one epoch, as pair indices, covering whole optimizer steps only.

    Each global micro-batch takes `batch_size * num_processes` consecutive pairs of the epoch's permutation and
    process p gets the p-th slice, so one process with batch 4 sees exactly what two processes with batch 2 see
    together. The tail that does not fill a whole optimizer step (fewer than batch_size * num_processes *
    accumulation pairs) is left out of this epoch; the trainer logs how many. The next epoch's permutation differs.
    """
    order = epoch_order(num_pairs, seed=seed, epoch=epoch)
    global_micro = batch_size * num_processes
    steps = optimizer_steps_per_epoch(num_pairs, batch_size=batch_size, num_processes=num_processes,
                                      accumulation=accumulation)
    batches = []
    for m in range(steps * accumulation):
        start = m * global_micro + process_index * batch_size
        batches.append(order[start:start + batch_size])
    return batches


def eval_micro_batches(
    num_pairs: int, *, batch_size: int, num_processes: int, process_index: int
) -> list[tuple[list[int], list[float]]]:
    """Every pair exactly once across processes, in order, as (indices, weights).

    All processes run the same number of batches of the same size (ZeRO-3 needs every rank in every forward), so
    the last global batch is filled up by repeating pair 0 with weight 0: it is computed and ignored.
    """
    global_micro = batch_size * num_processes
    num_batches = -(-num_pairs // global_micro)
    out = []
    for m in range(num_batches):
        start = m * global_micro + process_index * batch_size
        idx = [i for i in range(start, start + batch_size) if i < num_pairs]
        weights = [1.0] * len(idx) + [0.0] * (batch_size - len(idx))
        idx = idx + [0] * (batch_size - len(idx))
        out.append((idx, weights))
    return out


# ------------------------------------------------------------------------------------------------ collate


def sequences_of(pairs: list[dict[str, Any]]) -> tuple[list[list[int]], list[int]]:
    """Chosen sequences first, then rejected: token lists and their prompt lengths."""
    seqs, prompt_lens = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            seqs.append(list(pair["prompt_ids"]) + list(pair[key]))
            prompt_lens.append(len(pair["prompt_ids"]))
    return seqs, prompt_lens


def ref_logps_of(pairs: list[dict[str, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The precomputed reference log-probs of the pairs, [B] each, when the data carries them."""
    if all(c in pairs[0] for c in REF_COLUMNS):
        return (torch.tensor([p["ref_chosen_logps"] for p in pairs], dtype=torch.float32),
                torch.tensor([p["ref_rejected_logps"] for p in pairs], dtype=torch.float32))
    return None, None


def useful_tokens(pairs: list[dict[str, Any]], weights: list[float]) -> int:
    """Tokens of prompt+chosen plus prompt+rejected over the real pairs: the same count in every layout."""
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
               for p, w in zip(pairs, weights) if w > 0)


def pack_first_fit(lengths: list[int], *, bound: int) -> list[list[int]]:
    """Item indices per row, first-fit decreasing: each item goes into the first row it fits in under `bound`
    (an item longer than the bound gets a row of its own). Members of a row are returned in index order."""
    rows: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r in range(len(rows)):
            if used[r] + lengths[i] <= bound:
                rows[r].append(i)
                used[r] += lengths[i]
                break
        else:
            rows.append([i])
            used.append(lengths[i])
    return [sorted(members) for members in rows]


@dataclass
class RowPart:
    """A run of consecutive tokens of one row: a whole sequence (padded, packed layouts), or a shared prompt or one
    answer branch (prefix sharing)."""

    tokens: list[int]
    first_position: int  # position id of its first token
    segment: int  # the pair, group or sequence it belongs to: the mask keeps segments apart
    branch: int  # dpo.masks' branch code (SHARED, CHOSEN, REJECTED, or an answer index of a k-answer group)
    seq: int  # the sequence its predictions score; -1: none (a shared prompt)
    scored_from: int = 0  # index in `tokens` of the first token whose prediction is scored (its predictor)


def fill_rows(rows: list[list[RowPart]], *, pad_token_id: int, continue_positions: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, position_ids, target_ids, target_seq, segment, branch [R, T] of rows of parts, right-padded to
    the widest row: padding holds the pad id, segment -1 and branch PAD, is never scored, and either continues the
    last part's positions (`continue_positions`, the packed layout's rule) or has position 0. Each token of a scored
    part predicts the next one of the same part."""
    width = max(sum(len(p.tokens) for p in parts) for parts in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    target_ids = torch.zeros(shape, dtype=torch.long)
    target_seq = torch.full(shape, -1, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    branch = torch.full(shape, PAD, dtype=torch.long)
    for r, parts in enumerate(rows):
        offset = 0
        for part in parts:
            n = len(part.tokens)
            span = slice(offset, offset + n)
            input_ids[r, span] = torch.tensor(part.tokens, dtype=torch.long)
            position_ids[r, span] = torch.arange(part.first_position, part.first_position + n)
            segment[r, span] = part.segment
            branch[r, span] = part.branch
            if part.seq >= 0 and n > 1:
                target_ids[r, offset:offset + n - 1] = torch.tensor(part.tokens[1:], dtype=torch.long)
                target_seq[r, offset + part.scored_from:offset + n - 1] = part.seq
            offset += n
        if continue_positions and 0 < offset < width:
            last = int(position_ids[r, offset - 1])
            position_ids[r, offset:] = torch.arange(last + 1, last + 1 + width - offset)
    return input_ids, position_ids, target_ids, target_seq, segment, branch


def collate_padded(pairs: list[dict[str, Any]], *, pad_token_id: int, weights: list[float] | None = None
                   ) -> PreferenceBatch:
    """[chosen; rejected] as 2B right-padded rows.

    Example, one pair with prompt [5, 6], chosen [7, 2], rejected [8, 9, 2], pad 0:

        input_ids   = [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]
        target_ids  = [[6, 7, 2, 0, 0], [6, 8, 9, 2, 0]]
        target_seq  = [[-1, 0, 0, -1, -1], [-1, 1, 1, 1, -1]]   # position 1 predicts the first answer token
        attention_mask = [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]

    The model builds its own causal mask (windows and chunks included) from the 2D mask: this layout is exact on
    every causal LM whose real tokens do not depend on later padding, and is the baseline the others are checked
    against.
    """
    weights = weights if weights is not None else [1.0] * len(pairs)
    seqs, prompt_lens = sequences_of(pairs)
    width = max(len(s) for s in seqs)
    rows = len(seqs)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    target_ids = torch.zeros((rows, width), dtype=torch.long)
    target_seq = torch.full((rows, width), -1, dtype=torch.long)
    for r, (seq, plen) in enumerate(zip(seqs, prompt_lens)):
        n = len(seq)
        input_ids[r, :n] = torch.tensor(seq)
        attention_mask[r, :n] = 1
        target_ids[r, : n - 1] = input_ids[r, 1:n]
        target_seq[r, plen - 1: n - 1] = r  # predictions of the answer tokens seq[plen:]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    ref_chosen, ref_rejected = ref_logps_of(pairs)
    return PreferenceBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, target_ids=target_ids,
        target_seq=target_seq, pair_weight=torch.tensor(weights, dtype=torch.float32), num_pairs=len(pairs),
        num_tokens=useful_tokens(pairs, weights), ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
    )


def collate_packed(pairs: list[dict[str, Any]], *, pad_token_id: int, max_tokens_per_row: int,
                   weights: list[float] | None = None, attention: AttentionSpec | None = None,
                   mask_form: str = "dense") -> PreferenceBatch:
    """The 2B sequences packed first-fit decreasing into rows of at most `max_tokens_per_row` tokens.

    Position ids restart at 0 for each sequence, and an explicit 4D mask (`dpo.masks`, with the windows and chunks
    of `attention`) keeps the sequences of a row apart: many models (OPT, BLOOM, MPT, GPT-OSS, XGLM) never pass
    position ids to their mask builder and would otherwise attend across sequences. Rows are never wider than the
    longest sequence: the mask is dense on CPU, so attention costs rows x width², and wider rows only add
    masked-out work. Rows are right-padded to the longest row; padding continues the last sequence's positions,
    sees only itself and is never scored. `mask_form` (`dpo.masks.build_attention_mask`): "block" for
    FlexAttention, "varlen" for FlashAttention (no mask: the restarting position ids mark the sequences).
    """
    weights = weights if weights is not None else [1.0] * len(pairs)
    seqs, prompt_lens = sequences_of(pairs)
    bound = min(max_tokens_per_row, max(len(s) for s in seqs))
    rows = pack_first_fit([len(s) for s in seqs], bound=bound)
    parts = [[RowPart(seqs[s], 0, s, SHARED, s, prompt_lens[s] - 1) for s in members] for members in rows]
    input_ids, position_ids, target_ids, target_seq, segment, branch = fill_rows(
        parts, pad_token_id=pad_token_id, continue_positions=True)
    attention_mask = build_attention_mask(segment, branch, position_ids, attention or AttentionSpec(), form=mask_form)
    ref_chosen, ref_rejected = ref_logps_of(pairs)
    return PreferenceBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, target_ids=target_ids,
        target_seq=target_seq, pair_weight=torch.tensor(weights, dtype=torch.float32), num_pairs=len(pairs),
        num_tokens=useful_tokens(pairs, weights), ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
    )
