"""Per-sequence answer log-probs against a naive per-example full-softmax recomputation and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_reordered_close, batch_terms, model_terms

from demo.tiny import build_model
from dpo.data import collate_packed, collate_padded
from dpo.logprobs import label_logps, scatter_sequence_logps, sequence_logps

PAIRS = [
    {"prompt_ids": [1, 5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2]},
    {"prompt_ids": [1, 11], "chosen_ids": [12, 13, 14, 2], "rejected_ids": [15, 16, 17, 18, 19, 2]},
    {"prompt_ids": [1, 20, 21, 22, 23, 24], "chosen_ids": [2], "rejected_ids": [25, 2]},
]


@pytest.fixture(scope="module")
def model():
    return build_model(vocab_size=40, hidden_size=32, num_layers=2, seed=1)


def naive_logps(model, prompt, answer, *, average=False):
    """Full forward of one unpadded sequence, full log_softmax, sum over the answer tokens."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    picked = [logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1])]
    return sum(picked) / len(picked) if average else sum(picked)


def test_label_logps_hand_worked():
    # logits [0, ln 3] -> softmax [1/4, 3/4]; label 1 -> ln(3/4), label 0 -> ln(1/4)
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    got = label_logps(logits, torch.tensor([1, 0]), chunk_size=1)
    assert got.tolist() == pytest.approx([math.log(0.75), math.log(0.25)], abs=1e-7)


def test_label_logps_chunking_is_invariant():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 50, generator=generator)
    labels = torch.randint(0, 50, (37,), generator=generator)
    expected = F.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    for chunk in (1, 5, 37, 1000):
        assert_reordered_close(label_logps(logits, labels, chunk_size=chunk), expected, terms=50, msg=f"chunk {chunk}")


def test_scatter_hand_worked():
    # B = 1: sequence 0 (chosen) gets -1 and -2, sequence 1 (rejected) gets -4
    out = scatter_sequence_logps(torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([0, 0, 1]), 1, average=False)
    assert out.chosen_logps.tolist() == [-3.0] and out.rejected_logps.tolist() == [-4.0]
    assert out.chosen_lengths.tolist() == [2.0] and out.chosen_nll.tolist() == [1.5]
    avg = scatter_sequence_logps(torch.tensor([-1.0, -2.0, -4.0]), torch.tensor([0, 0, 1]), 1, average=True)
    assert avg.chosen_logps.tolist() == [-1.5] and avg.rejected_logps.tolist() == [-4.0]


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed", "packed_small_rows"])
def test_sequence_logps_equal_naive(model, layout, average):
    if layout == "padded":
        batch = collate_padded(PAIRS, pad_token_id=0)
    else:
        batch = collate_packed(PAIRS, pad_token_id=0, max_tokens_per_row=64 if layout == "packed" else 9)
    with torch.no_grad():
        out = sequence_logps(model, batch, average=average, chunk_size=4)
    chosen = [naive_logps(model, pair["prompt_ids"], pair["chosen_ids"], average=average) for pair in PAIRS]
    rejected = [naive_logps(model, pair["prompt_ids"], pair["rejected_ids"], average=average) for pair in PAIRS]
    terms = model_terms(model.config, positions=0, row_length=batch.input_ids.shape[-1])  # a forward only
    assert_reordered_close(out.chosen_logps, torch.tensor(chosen), terms=terms, msg="chosen")
    assert_reordered_close(out.rejected_logps, torch.tensor(rejected), terms=terms, msg="rejected")
    for i, pair in enumerate(PAIRS):
        assert out.chosen_lengths[i].item() == len(pair["chosen_ids"])
        assert out.rejected_lengths[i].item() == len(pair["rejected_ids"])


def test_prompt_and_padding_never_scored(model):
    """Changing prompt-side labels or pad tokens' targets cannot change the result: only answers are scored."""
    batch = collate_padded(PAIRS, pad_token_id=0)
    with torch.no_grad():
        base = sequence_logps(model, batch)
        batch.target_ids[batch.target_seq < 0] = 3  # scramble every unscored target
        again = sequence_logps(model, batch)
    torch.testing.assert_close(base.chosen_logps, again.chosen_logps)
    torch.testing.assert_close(base.rejected_logps, again.rejected_logps)


def test_gradients_flow_only_through_the_policy_forward(model):
    batch = collate_padded(PAIRS[:1], pad_token_id=0)
    out = sequence_logps(model, batch)
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_models_that_take_only_column_positions_in_logits_to_keep_give_the_same_logps(layout, monkeypatch):
    """transformers releases before the boolean [R, T] `logits_to_keep` index hidden[:, positions, :]; the fallback
    (the union of the kept columns, then the kept positions among them) must give the same log-probs and gradients."""
    from model_zoo import build

    from dpo import lm_head
    from dpo.layouts import make_collate

    model = build("llama").train()
    pairs = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12, 13]},
             {"prompt_ids": [3], "chosen_ids": [14, 15, 16], "rejected_ids": [17]}]
    batch = make_collate(layout, pad_token_id=0, max_tokens_per_row=64)(pairs, None)

    def run(*, columns: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(lm_head, "_BOOLEAN_KEEP", {type(model): False} if columns else {})
        model.zero_grad(set_to_none=True)
        results = []
        for with_log_sum_sq in (False, True):  # the chunked head and the model's own logits
            out = sequence_logps(model, batch, with_log_sum_sq=with_log_sum_sq)
            results.append(torch.cat([out.chosen_logps, out.rejected_logps]))
        torch.stack(results).sum().backward()
        return torch.stack(results).detach(), model.lm_head.weight.grad.clone()

    (values, grad), (column_values, column_grad) = run(columns=False), run(columns=True)
    terms = batch_terms(model, batch)
    assert_reordered_close(column_values, values, terms=terms, msg="log-probs")
    assert_reordered_close(column_grad, grad, terms=terms, msg="LM head gradient")
