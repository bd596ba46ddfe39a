"""Batch layouts and the split of the work: exact tensors for tiny inputs, nothing duplicated or lost."""

from __future__ import annotations

import torch

from dpo.data import collate_packed, collate_padded, eval_micro_batches, train_micro_batches

PAIR = {"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}


def test_collate_padded_docstring_example():
    batch = collate_padded([PAIR], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2, 0], [5, 6, 8, 9, 2]]
    assert batch.target_ids.tolist() == [[6, 7, 2, 0, 0], [6, 8, 9, 2, 0]]
    assert batch.target_seq.tolist() == [[-1, 0, 0, -1, -1], [-1, 1, 1, 1, -1]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 3], [0, 1, 2, 3, 4]]
    # useful tokens: (2 + 2) + (2 + 3)
    assert batch.num_tokens == 9 and batch.num_pairs == 1


def test_collate_padded_orders_chosen_then_rejected():
    other = {"prompt_ids": [1], "chosen_ids": [3, 2], "rejected_ids": [4, 2]}
    batch = collate_padded([PAIR, other], pad_token_id=0, weights=[1.0, 0.0])
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; sequence ids equal row ids
    assert batch.input_ids[1, :3].tolist() == [1, 3, 2]
    assert batch.input_ids[3, :3].tolist() == [1, 4, 2]
    for row in range(4):
        assert set(batch.target_seq[row].tolist()) == {-1, row}
    assert batch.pair_weight.tolist() == [1.0, 0.0]
    assert batch.num_tokens == 9  # the weight-0 pair is not counted


def test_collate_packed_layout():
    short = {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [4, 2]}
    batch = collate_packed([PAIR, short], pad_token_id=0, max_tokens_per_row=64)
    # sequences: chosen0 [5,6,7,2] (4), chosen1 [1,2] (2), rejected0 [5,6,8,9,2] (5), rejected1 [1,4,2] (3).
    # Rows are capped at the longest sequence (5); first-fit decreasing: [rejected0], [chosen0], [rejected1+chosen1]
    # -> the two short sequences share a row, in sequence order (chosen1 = sequence 1, then rejected1 = sequence 3).
    assert batch.input_ids.tolist() == [[5, 6, 8, 9, 2], [5, 6, 7, 2, 0], [1, 2, 1, 4, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert batch.target_seq.tolist() == [[-1, 2, 2, 2, -1], [-1, 0, 0, -1, -1], [1, -1, 3, 3, -1]]
    assert batch.target_ids.tolist() == [[6, 8, 9, 2, 0], [6, 7, 2, 0, 0], [2, 0, 4, 2, 0]]  # none crosses a sequence
    # An explicit block-diagonal causal mask (query row -> keys seen); the padding of row 1 sees only itself.
    allowed = [
        {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4]},
        {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [4]},
        {0: [0], 1: [0, 1], 2: [2], 3: [2, 3], 4: [2, 3, 4]},
    ]
    assert batch.attention_mask.shape == (3, 1, 5, 5)
    for row, keys_of in enumerate(allowed):
        expected = torch.full((5, 5), float("-inf"))
        for q, keys in keys_of.items():
            expected[q, keys] = 0.0
        assert torch.equal(batch.attention_mask[row, 0], expected)


def test_collate_packed_respects_the_row_bound():
    pairs = [PAIR, {"prompt_ids": [1, 1, 1], "chosen_ids": [3, 2], "rejected_ids": [4, 4, 2]}]
    batch = collate_packed(pairs, pad_token_id=0, max_tokens_per_row=6)
    lengths = [4, 5, 5, 6]  # chosen0, chosen1, rejected0, rejected1
    assert batch.input_ids.shape[0] == 4  # no two sequences fit together in 6 tokens
    per_row_tokens = [(batch.target_seq[r] >= 0).sum().item() for r in range(4)]
    assert sorted(per_row_tokens) == sorted(n - p for n, p in zip(lengths, [2, 3, 2, 3]))


def test_train_split_is_disjoint_and_matches_one_process():
    kwargs = dict(accumulation=2, seed=3, epoch=1)
    single = train_micro_batches(37, batch_size=4, num_processes=1, process_index=0, **kwargs)
    rank0 = train_micro_batches(37, batch_size=2, num_processes=2, process_index=0, **kwargs)
    rank1 = train_micro_batches(37, batch_size=2, num_processes=2, process_index=1, **kwargs)
    # 37 pairs, global batch 4 x 2 accumulation = 8: 4 optimizer steps, 8 micro-batches, 5 pairs left out
    assert len(single) == len(rank0) == len(rank1) == 8
    for s, a, b in zip(single, rank0, rank1):
        assert s == a + b  # the two processes together see exactly the single process's micro-batch
    seen = [i for mb in rank0 + rank1 for i in mb]
    assert len(seen) == len(set(seen)) == 32
    # deterministic per (seed, epoch), different across epochs
    assert single == train_micro_batches(37, batch_size=4, num_processes=1, process_index=0, **kwargs)
    assert single != train_micro_batches(37, batch_size=4, num_processes=1, process_index=0, accumulation=2, seed=3,
                                         epoch=2)


def test_eval_split_covers_every_pair_once():
    batches = [eval_micro_batches(11, batch_size=3, num_processes=2, process_index=p) for p in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == 2  # every rank runs the same number of batches
    real = [i for per_rank in batches for idx, w in per_rank for i, wi in zip(idx, w) if wi > 0]
    assert sorted(real) == list(range(11))
    padding = [w for per_rank in batches for _, ws in per_rank for w in ws if w == 0]
    assert len(padding) == 1  # 12 slots for 11 pairs
    assert all(len(idx) == 3 for per_rank in batches for idx, _ in per_rank)


def test_batch_to_device_keeps_everything():
    batch = collate_padded([PAIR], pad_token_id=0)
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.num_tokens == batch.num_tokens
