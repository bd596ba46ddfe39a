"""dpo/ranked_probe.py: the layout chosen on pairs is checked on rows of K answers per prompt and kept where exact;
a layout whose K-branch rows are not exact (a mask that lets the third branch see the others) falls back, saying
why, and an explicit request for it is refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from model_zoo import build

import dpo.ranked_batch as ranked_batch
from dpo.layouts import PACKED, PACKED_SHARED, LayoutError, choose_layout
from dpo.masks import build_attention_mask
from dpo.ranked_probe import check_ranked_layout, probe_records

CPU = SimpleNamespace(device=torch.device("cpu"), num_processes=1)


def config(**overrides):
    return SimpleNamespace(**{"mixed_precision": "no", "prefix_sharing": None, "layout": "auto",
                              "max_tokens_per_row": 256, **overrides})


def chosen(model):
    return choose_layout([model], layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=256,
                         precise=True)


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_an_exact_layout_is_kept(family):
    model = build(family, vocab_size=64)
    choice = chosen(model)
    assert choice.layout == PACKED_SHARED
    assert check_ranked_layout([model], choice, config(), CPU, pad_token_id=0, num_answers=4, longest=None) is choice


def leaky(segment, branch, position_ids, spec, *, form="dense"):
    """The mask with branch 3 treated as branch 1: the third answer sees the first (a leak only k > 2 shows)."""
    return build_attention_mask(segment, torch.where(branch == 3, 1, branch), position_ids, spec, form=form)


def test_a_leaking_k_branch_row_falls_back(monkeypatch):
    model = build("llama", vocab_size=64)
    choice = chosen(model)
    monkeypatch.setattr(ranked_batch, "build_attention_mask", leaky)
    checked = check_ranked_layout([model], choice, config(), CPU, pad_token_id=0, num_answers=3, longest=None)
    assert checked.layout == PACKED
    assert "3 answers per prompt: not packed with prefix sharing: LlamaForCausalLM gives log-probs" in checked.message
    with pytest.raises(LayoutError, match="not exact for rows of 3 answers"):
        check_ranked_layout([model], choice, config(layout="packed", prefix_sharing=True), CPU, pad_token_id=0,
                            num_answers=3, longest=None)


def test_probe_records_take_their_answers_from_the_pairs():
    pairs = [{"prompt_ids": [i], "chosen_ids": [10 + i], "rejected_ids": [20 + i]} for i in range(3)]
    records = probe_records(pairs, 4)
    assert records[0]["responses_ids"] == [[10], [20], [11], [21]]
    assert records[2]["responses_ids"] == [[12], [22], [10], [20]]
    assert all(r["scores"] == [4.0, 3.0, 2.0, 1.0] for r in records)
