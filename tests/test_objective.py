"""dpo/objective.py: answer positions recovered from the scatter order in every layout, LD-DPO and WPO against
naive per-pair recomputations from full-vocabulary log_softmax, and the loss inputs a config produces."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_scalars_reordered_close, model_terms

from demo.tiny import build_model
from dpo.layouts import make_collate
from dpo.logprobs import log_sum_sq_probs, sequence_logps
from dpo.objective import answer_logps, answer_positions, wpo_weights

VOCAB = 48
LAYOUTS = [("padded", False, 64), ("packed", False, 64), ("packed", False, 12), ("packed", True, 64),
           ("packed", True, 20), ("padded", True, 64)]


def make_pairs(seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    shapes = [(5, 1, 4), (9, 6, 2), (1, 3, 3), (7, 8, 1)]  # a 1-token answer, equal lengths, long tails
    return [{"prompt_ids": [rng.randrange(3, VOCAB) for _ in range(p)],
             "chosen_ids": [rng.randrange(3, VOCAB) for _ in range(c)],
             "rejected_ids": [rng.randrange(3, VOCAB) for _ in range(r)]} for p, c, r in shapes]


@pytest.fixture(scope="module")
def model():
    return build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=0, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2).eval()


def naive_token_logps(model, prompt, answer) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log p(answer_k) and log sum_v p(v)^2 from one unpadded forward, in float64."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].double()
    logprobs = F.log_softmax(logits, dim=-1)
    steps = range(len(prompt) - 1, len(prompt) + len(answer) - 1)
    token = torch.stack([logprobs[t, ids[0, t + 1]] for t in steps])
    sum_sq = torch.stack([torch.logsumexp(2 * logprobs[t], dim=-1) for t in steps])
    return token, sum_sq


def test_answer_positions_hand_worked():
    assert answer_positions(torch.tensor([0, 0, 2, 0, 2, 1])).tolist() == [0, 1, 0, 2, 1, 0]
    assert answer_positions(torch.tensor([], dtype=torch.long)).tolist() == []


@pytest.mark.parametrize("layout,shared,bound", LAYOUTS)
def test_positions_follow_answer_order_in_every_layout(layout, shared, bound):
    """The k-th scored token of sequence s (by the scatter's order) predicts answer token k of s."""
    pairs = make_pairs()
    batch = make_collate(layout, pad_token_id=0, max_tokens_per_row=bound, prefix_sharing=shared)(pairs, None)
    keep = batch.target_seq >= 0
    seq, targets = batch.target_seq[keep], batch.target_ids[keep]
    positions = answer_positions(seq)
    answers = [p["chosen_ids"] for p in pairs] + [p["rejected_ids"] for p in pairs]
    for s, k, token in zip(seq.tolist(), positions.tolist(), targets.tolist()):
        assert answers[s][k] == token, (s, k)
    every_token = [(s, k) for s, answer in enumerate(answers) for k in range(len(answer))]
    assert sorted(zip(seq.tolist(), positions.tolist())) == every_token


def test_log_sum_sq_probs_hand_worked():
    """Uniform over 4 tokens: sum p^2 = 4 * (1/4)^2 = 1/4. One-hot-ish: p = (1, 0): log 1 = 0."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]])
    assert log_sum_sq_probs(logits, chunk_size=1).tolist() == pytest.approx([math.log(0.25), 0.0], abs=1e-6)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("layout,shared,bound", LAYOUTS)
def test_ld_dpo_equals_naive(model, ld_alpha, layout, shared, bound):
    pairs = make_pairs(1)
    batch = make_collate(layout, pad_token_id=0, max_tokens_per_row=bound, prefix_sharing=shared)(pairs, None)
    with torch.no_grad():
        chosen, rejected = answer_logps(sequence_logps(model, batch), ld_alpha=ld_alpha)
    terms = model_terms(model.config, positions=0, row_length=batch.input_ids.shape[-1])  # a forward only
    for i, pair in enumerate(pairs):
        shared_len = min(len(pair["chosen_ids"]), len(pair["rejected_ids"]))
        for got, key in ((chosen[i], "chosen_ids"), (rejected[i], "rejected_ids")):
            token, _ = naive_token_logps(model, pair["prompt_ids"], pair[key])
            expected = token[:shared_len].sum() + ld_alpha * token[shared_len:].sum()
            assert_scalars_reordered_close(float(got), float(expected), terms=terms, scale=float(token.abs().sum()),
                                           msg=f"pair {i} {key}")


def test_ld_alpha_none_is_the_plain_sum(model):
    batch = make_collate("packed", pad_token_id=0, max_tokens_per_row=64, prefix_sharing=True)(make_pairs(), None)
    with torch.no_grad():
        out = sequence_logps(model, batch)
    plain = answer_logps(out)
    one = answer_logps(out, ld_alpha=1.0)
    assert plain[0] is out.chosen_logps
    torch.testing.assert_close(one[0], plain[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout,shared,bound", LAYOUTS)
def test_wpo_weights_equal_naive(model, layout, shared, bound):
    """w = exp(mean_k [log p(y_k) - log sum_v p(v)^2]) per answer, chosen x rejected, detached."""
    pairs = make_pairs(2)
    batch = make_collate(layout, pad_token_id=0, max_tokens_per_row=bound, prefix_sharing=shared)(pairs, None)
    model.train()
    out = sequence_logps(model, batch, with_log_sum_sq=True)
    weights = wpo_weights(out)
    assert not weights.requires_grad
    for i, pair in enumerate(pairs):
        expected = 1.0
        for key in ("chosen_ids", "rejected_ids"):
            token, sum_sq = naive_token_logps(model, pair["prompt_ids"], pair[key])
            expected *= math.exp(float((token - sum_sq).mean()))
        assert float(weights[i]) == pytest.approx(expected, rel=1e-5), i
    model.eval()


def test_wpo_needs_the_normaliser(model):
    batch = make_collate("padded", pad_token_id=0, max_tokens_per_row=64)(make_pairs(), None)
    with torch.no_grad(), pytest.raises(ValueError, match="with_log_sum_sq=True"):
        wpo_weights(sequence_logps(model, batch))
