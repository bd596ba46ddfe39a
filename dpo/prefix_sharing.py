"""Prefix sharing: the prompt of a pair is computed once for its chosen and its rejected answer.

Each pair becomes one sequence

    [ prompt[:-1] | p_last, chosen | p_last, rejected ]
      shared        chosen branch    rejected branch

where p_last = prompt[-1] appears twice, once at the head of each branch, both copies at the same position id
(P - 1 for a prompt of P tokens). A 4D additive mask lets every branch token see the shared prompt[:-1] and the
earlier tokens of its own branch, never the other branch; chosen[j] and rejected[j] both sit at position P + j.

Why two copies of p_last: the last prompt position predicts the first token of *both* answers, but `target_seq`
holds one sequence per position. Each copy sees exactly prompt[:-1] and itself at position P - 1, which is what
the last prompt token sees in the padded layout, so both copies compute the same hidden state and each scores its
own answer's first token. Every scored position therefore has the same inputs, positions and visible context as
in the padded layout: the layout is exact (up to float summation order), and it costs P + C + R + 1 tokens per
pair instead of 2P + C + R.

Sliding windows and chunks count positions within the sequence: the shared prompt is part of the chosen sequence
and of the rejected one, so a branch token at position P + j sees the prompt tokens its window reaches in either
(`dpo.masks`). Models whose biases or states follow the order of tokens in the row (ALiBi, convolutions, linear
attention, SSMs) cannot be exact in this layout; `dpo.layouts` checks each model before using it.

Pairs are packed first-fit decreasing into rows of at most min(`max_tokens_per_row`, longest pair) tokens (one
pair per row when `packed=False`). The mask is dense (attention is quadratic in the row length with sdpa), so rows
never grow wider than the unpacked layout's would be.
Padding positions attend only to themselves (so no softmax row is empty) and are never attended or scored.
"""

from __future__ import annotations

from typing import Any

import torch

from dpo.data import PreferenceBatch, RowPart, fill_rows, pack_first_fit, ref_logps_of, useful_tokens
from dpo.masks import CHOSEN, REJECTED, SHARED, AttentionSpec, build_attention_mask


def shared_length(pair: dict[str, Any]) -> int:
    """Tokens of a pair in the shared layout: P - 1 + (1 + C) + (1 + R)."""
    return len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"]) + 1


def collate_prefix_shared(pairs: list[dict[str, Any]], *, pad_token_id: int, max_tokens_per_row: int,
                          weights: list[float] | None = None, packed: bool = True,
                          attention: AttentionSpec | None = None, mask_form: str = "dense") -> PreferenceBatch:
    """B pairs as prefix-shared sequences in R rows, with a [R, 1, T, T] additive float mask (0 or -inf), or a
    mapping of such masks by layer type (`dpo.masks`, with the windows and chunks of `attention`); with
    mask_form "block" the same rules as a `dpo.masks.SegmentMask` (FlexAttention BlockMasks at the forward).

    Example, one pair with prompt [5, 6], chosen [7, 2], rejected [8, 9, 2], pad 0:

        input_ids    = [[5, 6, 7, 2, 6, 8, 9, 2]]
        position_ids = [[0, 1, 2, 3, 1, 2, 3, 4]]        # the second 6 restarts at the prompt's last position
        target_ids   = [[0, 7, 2, 0, 8, 9, 2, 0]]
        target_seq   = [[-1, 0, 0, -1, 1, 1, 1, -1]]     # chosen of pair 0 is sequence 0, its rejected is 1
        attention_mask[0, 0] = 0 where allowed, -inf elsewhere; allowed (row = query, column = key):
            5: 5                    6: 5 6            7: 5 6 7           2: 5 6 7 2
            6: 5 . . . 6            8: 5 . . . 6 8    9: 5 . . . 6 8 9   2: 5 . . . 6 8 9 2
    """
    weights = weights if weights is not None else [1.0] * len(pairs)
    num_pairs = len(pairs)
    for i, pair in enumerate(pairs):
        if len(pair["prompt_ids"]) == 0:
            raise ValueError(f"pair {i}: an empty prompt cannot be shared (the last prompt token predicts the "
                             f"first answer token)")
    lengths = [shared_length(p) for p in pairs]
    # Rows no wider than the longest pair: the dense mask makes attention quadratic in the row length, so wider
    # rows only add attention work, while first-fit packing up to that width already removes most of the padding.
    bound = min(max_tokens_per_row, max(lengths))
    rows = pack_first_fit(lengths, bound=bound) if packed else [[i] for i in range(len(pairs))]
    parts = []
    for members in rows:
        row = []
        for slot, i in enumerate(members):
            prompt, chosen, rejected = (list(pairs[i][k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            p = len(prompt)
            row += [RowPart(prompt[:-1], 0, slot, SHARED, -1),  # each branch token predicts the next of its branch
                    RowPart(prompt[-1:] + chosen, p - 1, slot, CHOSEN, i),
                    RowPart(prompt[-1:] + rejected, p - 1, slot, REJECTED, num_pairs + i)]
        parts.append(row)
    input_ids, position_ids, target_ids, target_seq, segment, branch = fill_rows(
        parts, pad_token_id=pad_token_id, continue_positions=False)
    if mask_form == "varlen":
        raise ValueError("prefix sharing needs a custom mask; a varlen kernel (FlashAttention) cannot take one")
    attention_mask = build_attention_mask(segment, branch, position_ids, attention or AttentionSpec(), form=mask_form)
    ref_chosen, ref_rejected = ref_logps_of(pairs)
    return PreferenceBatch(
        input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, target_ids=target_ids,
        target_seq=target_seq, pair_weight=torch.tensor(weights, dtype=torch.float32), num_pairs=num_pairs,
        num_tokens=useful_tokens(pairs, weights), ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected,
    )
