"""Batches of prompts with k >= 2 scored answers, in every layout of `dpo.layouts`, and their per-answer log-probs.

A ranked record (`data_prep` writes `responses_ids` and `scores`; a pairwise record is read as k = 2 with scores
[1, 0]) becomes K answer sequences, K the most answers any record of the data has. Answer a of prompt i is sequence
a * B + i, so for K = 2 chosen is i and rejected B + i, exactly as in a pairwise batch: the same collate output,
token for token, and the same forward (`dpo.logprobs.sequence_logps`, which addresses 2n sequences; a ranked batch
asks it for n = ceil(K * B / 2)). A prompt with fewer than K answers leaves its missing sequences empty (score NaN).

Layouts, each the generalisation of its pairwise form (tests/test_ranked.py checks K = 2 gives the same tensors):

    shared   [ prompt[:-1] | p_last, answer_1 | p_last, answer_2 | ... | p_last, answer_k ] per prompt: branch b
             (code 1 + b, `dpo.masks`) sees the shared prompt and itself only; the prompt costs one forward for all
             k answers (P - 1 + sum_b (1 + A_b) tokens instead of k * P + sum_b A_b). Packed or one prompt per row.
    packed   every prompt + answer its own sequence, several per row (`dpo.masks` keeps them apart)
    padded   every prompt + answer its own right-padded row; the model builds its own masks
    single   the padded rows, each run alone (`dpo.layouts.SINGLE`)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc
import torch

from dpo.data import PreferenceBatch, RowPart, fill_rows, pack_first_fit
from dpo.masks import SHARED, AttentionSpec, SegmentMask, build_attention_mask

RANKED_COLUMNS = ("responses_ids", "scores")
REF_ANSWER_COLUMN = "ref_logps"  # dpo.precompute_ref: one reference log-prob per answer, input order


@dataclass(frozen=True)
class RankedGroup:
    """One prompt and its answers, in input order; `scores` higher is better."""

    prompt: list[int]
    answers: list[list[int]]
    scores: list[float]
    ref_logps: list[float] | None = None


def group_of(record: dict[str, Any]) -> RankedGroup:
    """A dataset row as a group: a ranked row as written, a pairwise row as [chosen, rejected] scored [1, 0]."""
    if "responses_ids" in record:
        ref = record.get(REF_ANSWER_COLUMN)
        return RankedGroup(list(record["prompt_ids"]), [list(a) for a in record["responses_ids"]],
                           [float(s) for s in record["scores"]], None if ref is None else [float(v) for v in ref])
    ref = ([float(record["ref_chosen_logps"]), float(record["ref_rejected_logps"])]
           if "ref_chosen_logps" in record and "ref_rejected_logps" in record else None)
    return RankedGroup(list(record["prompt_ids"]), [list(record["chosen_ids"]), list(record["rejected_ids"])],
                       [1.0, 0.0], ref)


def max_answers(dataset: Any) -> int:
    """K: the most answers a record of `dataset` has (2 for pairwise data)."""
    if "responses_ids" not in dataset.column_names:
        return 2
    return int(pc.max(pc.list_value_length(dataset.data.column("responses_ids"))).as_py())


def longest_ranked_sequence(dataset: Any) -> int:
    """Tokens of the longest prompt + answer over every answer of a ranked split."""
    responses = dataset.data.column("responses_ids").combine_chunks()
    prompt = pc.list_value_length(dataset.data.column("prompt_ids")).combine_chunks()
    answers = pc.list_value_length(pc.list_flatten(responses))
    return int(pc.max(pc.add(answers, prompt.take(pc.list_parent_indices(responses)))).as_py() or 0)


@dataclass
class RankedBatch(PreferenceBatch):
    """A PreferenceBatch of B prompts with K answer slots each, seen by `sequence_logps` as num_pairs =
    ceil(K * B / 2) pairs (its sequence s = a * B + i is answer a of prompt i).

    num_prompts:     B
    num_answers:     K
    scores:          [B, K] float64, NaN where a prompt has no answer a
    pair_weight:     [B] float here: one weight per prompt (1 real, 0 only fills the last eval batch); the
                     forward never reads it, the loss and the metrics weigh prompts with it
    ref_answer_logps: [B, K] float, precomputed reference log-probs (NaN where absent), or None
    """

    num_prompts: int = 0
    num_answers: int = 2
    scores: torch.Tensor | None = None
    ref_answer_logps: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "RankedBatch":
        moved = PreferenceBatch.to(self, device)
        return RankedBatch(**vars(moved), num_prompts=self.num_prompts, num_answers=self.num_answers,
                           scores=_move(self.scores, device),
                           ref_answer_logps=_move(self.ref_answer_logps, device))

    def unflatten(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        """[B, K] from the two halves `sequence_logps` returns (its "chosen" and "rejected" sequences)."""
        flat = torch.cat([first, second])[: self.num_answers * self.num_prompts]
        return flat.view(self.num_answers, self.num_prompts).T


def _move(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def _sequences(groups: list[RankedGroup], num_answers: int) -> list[tuple[int, list[int], int]]:
    """(sequence index, prompt + answer, prompt length) of every present answer, in sequence order."""
    num_prompts = len(groups)
    return [(a * num_prompts + i, g.prompt + g.answers[a], len(g.prompt))
            for a in range(num_answers) for i, g in enumerate(groups) if a < len(g.answers)]


def collate_ranked(records: list[dict[str, Any]], weights: list[float] | None = None, *, layout: Any,
                   num_answers: int, pad_token_id: int, max_tokens_per_row: int,
                   attention: AttentionSpec | None = None, mask_form: str = "dense") -> RankedBatch:
    """B records (`group_of`) as a RankedBatch in `layout` (a `dpo.layouts.Layout`), K = `num_answers` slots.

    Example, shared layout, one prompt [5, 6] with answers [7, 2], [8, 2], [9, 3, 2] (K = 3, B = 1):

        input_ids    = [[5, 6, 7, 2, 6, 8, 2, 6, 9, 3, 2]]
        position_ids = [[0, 1, 2, 3, 1, 2, 3, 1, 2, 3, 4]]
        branch       = [[0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]]   # each answer branch sees branch 0 and itself
        target_seq   = [[-1, 0, 0, -1, 1, 1, -1, 2, 2, 2, -1]]
    """
    groups = [group_of(r) for r in records]
    num_prompts = len(groups)
    weights = weights if weights is not None else [1.0] * num_prompts
    too_many = [len(g.answers) for g in groups if len(g.answers) > num_answers]
    if too_many:
        raise ValueError(f"a record has {too_many[0]} answers, more than the batch's {num_answers} slots")
    spec = attention or AttentionSpec()
    if layout.shared:
        tensors, mask = _shared(groups, num_answers, packed=layout.packed, pad_token_id=pad_token_id,
                                max_tokens_per_row=max_tokens_per_row, spec=spec, mask_form=mask_form)
    elif layout.packed:
        tensors, mask = _packed(groups, num_answers, pad_token_id=pad_token_id,
                                max_tokens_per_row=max_tokens_per_row, spec=spec, mask_form=mask_form)
    else:
        tensors, mask = _padded(groups, num_answers, pad_token_id=pad_token_id)
    input_ids, position_ids, target_ids, target_seq = tensors
    scores = torch.full((num_prompts, num_answers), math.nan, dtype=torch.float64)
    ref = torch.full((num_prompts, num_answers), math.nan, dtype=torch.float32)
    for i, g in enumerate(groups):
        scores[i, :len(g.scores)] = torch.tensor(g.scores, dtype=torch.float64)
        if g.ref_logps is not None:
            ref[i, :len(g.ref_logps)] = torch.tensor(g.ref_logps, dtype=torch.float32)
    has_ref = all(g.ref_logps is not None for g in groups)
    half = math.ceil(num_answers * num_prompts / 2)
    flat_ref = ref.T.reshape(-1)
    flat_ref = torch.cat([flat_ref, flat_ref.new_zeros(2 * half - flat_ref.numel())])
    # The tokens of every prompt + answer of the real prompts, whatever the layout (dpo.data.useful_tokens).
    useful = sum(len(g.prompt) * len(g.answers) + sum(map(len, g.answers)) for g, w in zip(groups, weights) if w > 0)
    return RankedBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=mask, target_ids=target_ids,
        target_seq=target_seq, pair_weight=torch.tensor(weights, dtype=torch.float32), num_pairs=half,
        num_tokens=int(useful),
        ref_chosen_logps=flat_ref[:half] if has_ref else None, ref_rejected_logps=flat_ref[half:] if has_ref else None,
        alone=layout.alone, num_prompts=num_prompts, num_answers=num_answers, scores=scores,
        ref_answer_logps=ref if has_ref else None)


Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _shared(groups: list[RankedGroup], num_answers: int, *, packed: bool, pad_token_id: int,
            max_tokens_per_row: int, spec: AttentionSpec, mask_form: str
            ) -> tuple[Tensors, torch.Tensor | dict[str, torch.Tensor] | SegmentMask | None]:
    """`dpo.prefix_sharing`'s layout with k branches: p_last heads every branch at position P - 1."""
    if mask_form == "varlen":
        raise ValueError("prefix sharing needs a custom mask; a varlen kernel (FlashAttention) cannot take one")
    for i, g in enumerate(groups):
        if not g.prompt:
            raise ValueError(f"record {i}: an empty prompt cannot be shared (the last prompt token predicts the "
                             f"first answer token)")
    lengths = [len(g.prompt) - 1 + sum(1 + len(a) for a in g.answers) for g in groups]
    bound = min(max_tokens_per_row, max(lengths))
    rows = pack_first_fit(lengths, bound=bound) if packed else [[i] for i in range(len(groups))]
    parts = []
    for members in rows:
        row = []
        for slot, i in enumerate(members):
            g, p = groups[i], len(groups[i].prompt)
            row.append(RowPart(g.prompt[:-1], 0, slot, SHARED, -1))
            row += [RowPart(g.prompt[-1:] + a, p - 1, slot, SHARED + 1 + b, b * len(groups) + i)
                    for b, a in enumerate(g.answers)]
        parts.append(row)
    input_ids, position_ids, target_ids, target_seq, segment, branch = fill_rows(
        parts, pad_token_id=pad_token_id, continue_positions=False)
    mask = build_attention_mask(segment, branch, position_ids, spec, form=mask_form)
    return (input_ids, position_ids, target_ids, target_seq), mask


def _packed(groups: list[RankedGroup], num_answers: int, *, pad_token_id: int, max_tokens_per_row: int,
            spec: AttentionSpec, mask_form: str
            ) -> tuple[Tensors, torch.Tensor | dict[str, torch.Tensor] | SegmentMask | None]:
    """`dpo.data.collate_packed`'s layout: every prompt + answer its own segment (its sequence index)."""
    seqs = _sequences(groups, num_answers)
    bound = min(max_tokens_per_row, max(len(s) for _, s, _ in seqs))
    rows = pack_first_fit([len(s) for _, s, _ in seqs], bound=bound)
    parts = [[RowPart(seqs[m][1], 0, seqs[m][0], SHARED, seqs[m][0], seqs[m][2] - 1) for m in members]
             for members in rows]
    input_ids, position_ids, target_ids, target_seq, segment, branch = fill_rows(
        parts, pad_token_id=pad_token_id, continue_positions=True)
    mask = build_attention_mask(segment, branch, position_ids, spec, form=mask_form)
    return (input_ids, position_ids, target_ids, target_seq), mask


def _padded(groups: list[RankedGroup], num_answers: int, *, pad_token_id: int) -> tuple[Tensors, torch.Tensor]:
    """`dpo.data.collate_padded`'s layout: one right-padded row per prompt + answer, a [R, T] 2D mask."""
    seqs = _sequences(groups, num_answers)
    parts = [[RowPart(s, 0, 0, SHARED, index, plen - 1)] for index, s, plen in seqs]
    input_ids, _, target_ids, target_seq, segment, _ = fill_rows(parts, pad_token_id=pad_token_id,
                                                                 continue_positions=False)
    attention_mask = (segment >= 0).long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return (input_ids, position_ids, target_ids, target_seq), attention_mask


def make_ranked_collate(layout: Any, *, num_answers: int, pad_token_id: int, max_tokens_per_row: int,
                        attention: AttentionSpec | None = None, mask_form: str = "dense"
                        ) -> Callable[[list[dict[str, Any]], list[float] | None], RankedBatch]:
    """`collate(records, weights)` of a layout for data with up to `num_answers` answers per prompt."""
    return lambda records, weights=None: collate_ranked(
        records, weights, layout=layout, num_answers=num_answers, pad_token_id=pad_token_id,
        max_tokens_per_row=max_tokens_per_row, attention=attention, mask_form=mask_form)
