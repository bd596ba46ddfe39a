"""The listwise objectives and ranking metrics (dpo/listwise.py) against naive per-prompt loops in float64, their
k = 2 reductions to the pairwise losses, and the k-answer batches (dpo/ranked_batch.py): K = 2 gives the pairwise
collates' tensors, and every layout's per-answer log-probs equal each prompt + answer run alone."""

from __future__ import annotations

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from model_zoo import build
from test_flex_attention import eager_flex  # noqa: F401 - the fixture

from dpo.layouts import PACKED, PACKED_SHARED, PADDED, SHARED, SINGLE, make_collate
from dpo.listwise import (
    finish_ranking_metrics,
    kendall_tau_b,
    listwise_loss,
    ranking_values,
    scored_pairs,
)
from dpo.logprobs import sequence_logps
from dpo.losses import preference_loss
from dpo.masks import AttentionSpec, MaskRule, attention_spec
from dpo.ranked_batch import make_ranked_collate

NAN = math.nan
# Prompts with 4, 3 (one slot empty), 2 answers; partial ties in the first, the best last in the second.
SCORES = torch.tensor([[3.0, 1.0, 3.0, 0.5], [0.0, 1.0, 2.0, NAN], [2.0, 7.0, NAN, NAN]], dtype=torch.float64)


def logps(seed: int) -> torch.Tensor:
    return -torch.rand(SCORES.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 20


def tau_b(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b by its definition, pair by pair: (concordant - discordant) / sqrt((n0 - ties in x)(n0 -
    ties in y)), n0 the number of pairs."""
    pairs = list(itertools.combinations(range(len(x)), 2))
    sign = [((x[i] > x[j]) - (x[i] < x[j])) * ((y[i] > y[j]) - (y[i] < y[j])) for i, j in pairs]
    untied_x = sum(x[i] != x[j] for i, j in pairs)
    untied_y = sum(y[i] != y[j] for i, j in pairs)
    return sum(sign) / math.sqrt(untied_x * untied_y)


def order_of(scores: list[float]) -> list[int]:
    """Answer indices best first, ties in input order (a plain Python sort is stable)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def naive(name: str, policy: torch.Tensor, ref: torch.Tensor, beta: float) -> list[float]:
    out = []
    for b in range(SCORES.shape[0]):
        s = [float(v) for v in SCORES[b] if not math.isnan(v)]
        h = [beta * (float(policy[b, i]) - float(ref[b, i])) for i in range(len(s))]
        order = order_of(s)
        if name in ("all_pairs", "best_vs_rest"):
            pairs = [(i, j) for i, j in itertools.permutations(range(len(s)), 2) if s[i] > s[j]]
            if name == "best_vs_rest":
                pairs = [(i, j) for i, j in pairs if i == order[0]]
            out.append(sum(math.log1p(math.exp(-(h[i] - h[j]))) for i, j in pairs) / len(pairs))
        elif name == "plackett_luce":
            hs = [h[i] for i in order]
            terms = [hs[i] - math.log(sum(math.exp(x) for x in hs[i:])) for i in range(len(hs) - 1)]
            out.append(-sum(terms) / (len(hs) - 1))
        else:
            best = order[0]
            negatives = [j for j in range(len(s)) if s[j] < s[best]]
            x = -math.log(sum(math.exp(h[j] - h[best]) for j in negatives))
            out.append(math.log1p(math.exp(-x)))
    return out


@pytest.mark.parametrize("name", ["all_pairs", "best_vs_rest", "plackett_luce", "softmax_negatives"])
def test_objectives_equal_naive_loops(name):
    policy, ref = logps(0).requires_grad_(), logps(1)
    out = listwise_loss(name, policy, ref, SCORES, loss_type="sigmoid", beta=0.3)
    assert out.losses.tolist() == pytest.approx(naive(name, policy.detach(), ref, 0.3), rel=1e-12)
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert (policy.grad[torch.isnan(SCORES)] == 0).all()  # an absent answer gets no gradient


def test_tied_pairs_are_left_out():
    prompt, better, worse = scored_pairs(SCORES, best_only=False)
    found = {(int(b), int(i), int(j)) for b, i, j in zip(prompt, better, worse)}
    assert (0, 0, 2) not in found and (0, 2, 0) not in found  # scores 3 and 3
    assert found == {(b, i, j) for b in range(3) for i in range(4) for j in range(4)
                     if not math.isnan(SCORES[b, i]) and not math.isnan(SCORES[b, j]) and SCORES[b, i] > SCORES[b, j]}


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust", "aot", "sft", "simpo"])
def test_two_answers_equal_the_pairwise_loss_exactly(loss_type):
    policy, ref = logps(2)[:, :2], logps(3)[:, :2]
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 2.0]], dtype=torch.float64)
    lengths = torch.tensor([[3.0, 4.0], [5.0, 2.0], [1.0, 6.0]], dtype=torch.float64)
    nll = -policy / lengths
    options = dict(label_smoothing=0.1 if loss_type == "robust" else 0.0, rpo_alpha=0.5)
    chosen = scores.argmax(-1)
    pick = lambda t, idx: t.gather(-1, idx[:, None]).squeeze(-1)  # noqa: E731
    rejected = 1 - chosen
    pairwise = preference_loss(loss_type, pick(policy, chosen), pick(policy, rejected), pick(ref, chosen),
                               pick(ref, rejected), beta=0.2, chosen_lengths=pick(lengths, chosen),
                               rejected_lengths=pick(lengths, rejected), chosen_nll=pick(nll, chosen),
                               chosen_nll_sum=pick(nll * lengths, chosen), pair_weight=torch.ones(3), **options)
    for name in ("all_pairs", "best_vs_rest"):
        out = listwise_loss(name, policy, ref, scores, loss_type=loss_type, beta=0.2, lengths=lengths, nll=nll,
                            nll_sum=nll * lengths, prompt_weight=torch.ones(3), **options)
        assert torch.equal(out.losses, pairwise.losses), name
    sigmoid = preference_loss("sigmoid", pick(policy, chosen), pick(policy, rejected), pick(ref, chosen),
                              pick(ref, rejected), beta=0.2).losses
    for name in ("plackett_luce", "softmax_negatives"):
        out = listwise_loss(name, policy, ref, scores, loss_type=loss_type, beta=0.2)
        torch.testing.assert_close(out.losses, sigmoid, rtol=1e-12, atol=0), name


def test_ranking_metrics_against_definitions_and_counts():
    policy, ref = logps(4), logps(5)
    rewards = 0.1 * (policy - ref)
    rewards = torch.where(torch.isnan(SCORES), NAN, rewards)
    tau = kendall_tau_b(rewards, SCORES)
    for b in range(3):
        present = ~torch.isnan(SCORES[b])
        expected = tau_b(rewards[b, present].tolist(), SCORES[b, present].tolist())
        assert float(tau[b]) == pytest.approx(expected, rel=1e-12)
    values = ranking_values(torch.zeros(3), rewards, SCORES, policy, ref)
    sums = {k: float(v.sum()) for k, v in values.items() if v is not None}
    means = finish_ranking_metrics({k: v / 3 for k, v in sums.items()})
    pairs = [(b, i, j) for b in range(3) for i in range(4) for j in range(4)
             if not math.isnan(SCORES[b, i]) and not math.isnan(SCORES[b, j]) and SCORES[b, i] > SCORES[b, j]]
    right = sum(float(rewards[b, i]) > float(rewards[b, j]) for b, i, j in pairs)
    assert means["rewards/accuracies"] == pytest.approx(right / len(pairs))
    tops = []
    for b in range(3):
        s = [float(v) for v in SCORES[b] if not math.isnan(v)]
        r = [float(rewards[b, i]) for i in range(len(s))]
        tops.append(s[max(range(len(s)), key=lambda i: r[i])] == max(s))
    assert means["ranking/top_accuracy"] == pytest.approx(sum(tops) / 3)
    for rank in range(1, 5):
        ranked = [float(rewards[b, order_of([float(v) for v in SCORES[b] if not math.isnan(v)])[rank - 1]])
                  for b in range(3) if (~torch.isnan(SCORES[b])).sum() >= rank]
        assert means[f"rewards/rank_{rank}"] == pytest.approx(sum(ranked) / len(ranked))
    assert "ranking/pairs" not in means and not any(k.startswith("ranking/with_rank") for k in means)


# ------------------------------------------------------------------------------------------------ batches

PAIRS = [{"prompt_ids": [5, 6, 1], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]},
         {"prompt_ids": [3], "chosen_ids": [4, 4, 4, 2], "rejected_ids": [9, 2]},
         {"prompt_ids": [3, 3, 3, 3], "chosen_ids": [1, 2], "rejected_ids": [9, 9, 9, 9, 9, 2]}]
WINDOW = AttentionSpec(rules=(("", MaskRule(window=3)),))


@pytest.mark.parametrize("layout", [PACKED_SHARED, SHARED, PACKED, PADDED, SINGLE], ids=lambda x: x.name)
def test_two_answers_give_the_pairwise_collates_tensors(layout):
    pairwise = make_collate(layout, pad_token_id=0, max_tokens_per_row=12, attention=WINDOW)(PAIRS, [1, 1, 0])
    ranked = make_ranked_collate(layout, num_answers=2, pad_token_id=0, max_tokens_per_row=12,
                                 attention=WINDOW)(PAIRS, [1, 1, 0])
    for name in ("input_ids", "position_ids", "target_ids", "target_seq", "attention_mask", "pair_weight"):
        assert torch.equal(getattr(pairwise, name), getattr(ranked, name)), name
    assert (pairwise.num_pairs, pairwise.num_tokens, pairwise.alone) == (ranked.num_pairs, ranked.num_tokens,
                                                                         ranked.alone)


RANKED = [{"prompt_ids": [5, 6, 1], "responses_ids": [[7, 2], [8, 9, 2], [4, 4, 4, 4, 4, 4, 4, 2], [1, 2]],
           "scores": [1.0, 3.0, 2.0, 0.0]},
          {"prompt_ids": [3], "responses_ids": [[4, 4, 4, 2], [9, 2], [11, 12, 13, 2]], "scores": [0.0, 1.0, 2.0]},
          {"prompt_ids": [3, 3, 3, 3, 7, 8], "responses_ids": [[1, 2], [9, 9, 9, 9, 9, 2]], "scores": [2.0, 1.0]}]


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
@pytest.mark.parametrize("layout", [PACKED_SHARED, SHARED, PACKED, PADDED, SINGLE], ids=lambda x: x.name)
def test_every_layout_gives_each_answer_its_log_prob_alone(layout, family):
    """k branches of one prompt (and windows counted in sequence positions: the zoo's window is shorter than
    the longest sequences here) against each prompt + answer run alone by the same fp32 model (log-softmax in
    float64)."""
    model = build(family, vocab_size=32)
    spec = attention_spec(model.config)
    batch = make_ranked_collate(layout, num_answers=4, pad_token_id=0, max_tokens_per_row=40,
                                attention=spec)(RANKED, None)
    with torch.no_grad():
        out = sequence_logps(model, batch)
        got = batch.unflatten(out.chosen_logps, out.rejected_logps)
        for b, record in enumerate(RANKED):
            for a, answer in enumerate(record["responses_ids"]):
                ids = torch.tensor([record["prompt_ids"] + answer])
                logits = model(input_ids=ids).logits[0].double()
                token = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                alone = float(token[len(record["prompt_ids"]) - 1:].sum())
                assert float(got[b, a]) == pytest.approx(alone, rel=1e-5, abs=1e-5), (b, a)
            assert (got[b, len(record["responses_ids"]):] == 0).all()  # empty slots score nothing


def test_shared_branches_cannot_see_each_other():
    """Negative control: with the branch rule removed (every token of a row's segment sees all earlier ones),
    the shared layout's log-probs move far from the single-sequence ones, so the test above can see a leak."""
    torch.manual_seed(0)
    model = build("llama", vocab_size=32)
    batch = make_ranked_collate(SHARED, num_answers=4, pad_token_id=0, max_tokens_per_row=40)(RANKED, None)
    exact = make_ranked_collate(SINGLE, num_answers=4, pad_token_id=0, max_tokens_per_row=40)(RANKED, None)
    with torch.no_grad():
        truth = sequence_logps(model, exact)
        mask = batch.attention_mask.clone()
        segments = (batch.input_ids >= 0)
        causal = torch.tril(torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool))
        batch.attention_mask = torch.zeros_like(mask).masked_fill_(~(causal & segments[:, None, :])[:, None],
                                                                   float("-inf"))
        leaked = sequence_logps(model, batch)
    gap = (torch.cat([leaked.chosen_logps, leaked.rejected_logps])
           - torch.cat([truth.chosen_logps, truth.rejected_logps])).abs().max()
    assert gap > 0.1


# ------------------------------------------------------------------------------------------------ config


def test_listwise_config_is_checked_at_start_up():
    from dpo.config import ConfigError, load_config

    assert load_config(["--listwise_loss", "plackett_luce"]).listwise_loss == "plackett_luce"
    with pytest.raises(ConfigError, match="listwise_loss: unknown 'listnet'; expected one of all_pairs"):
        load_config(["--listwise_loss", "listnet"])
    for flag in (["--use_weighting", "true"], ["--ld_alpha", "0.5"]):
        with pytest.raises(ConfigError, match="defined for pairs only"):
            load_config(["--listwise_loss", "all_pairs", *flag])


def test_ranked_data_refuses_pair_only_options():
    """Ranked data without --listwise_loss (all_pairs by default) is refused WPO, LD-DPO and sequence parallelism
    (whose split sums log-probs of pairs only) at start-up too."""
    from dpo.errors import UserError
    from dpo.listwise_step import check_ranked_run

    with pytest.raises(UserError, match="use_weighting"):
        check_ranked_run(SimpleNamespace(use_weighting=True, ld_alpha=None, sequence_parallel_size=1))
    with pytest.raises(UserError, match="ld_alpha"):
        check_ranked_run(SimpleNamespace(use_weighting=False, ld_alpha=0.5, sequence_parallel_size=1))
    with pytest.raises(UserError, match="sequence_parallel_size 2 with k-answer data"):
        check_ranked_run(SimpleNamespace(use_weighting=False, ld_alpha=None, sequence_parallel_size=2))
    check_ranked_run(SimpleNamespace(use_weighting=False, ld_alpha=None, sequence_parallel_size=1))


@pytest.mark.parametrize("family", ["llama", "mistral_window"])
def test_flex_attention_block_masks_serve_k_branch_rows(family, eager_flex):  # noqa: F811
    """The same rule as block masks (FlexAttention, uncompiled): k branches per prompt equal each answer alone."""
    model = build(family, vocab_size=32)
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("flex_attention")
    batch = make_ranked_collate(PACKED_SHARED, num_answers=4, pad_token_id=0, max_tokens_per_row=40,
                                attention=attention_spec(model.config), mask_form="block")(RANKED, None)
    single = make_ranked_collate(SINGLE, num_answers=4, pad_token_id=0, max_tokens_per_row=40)(RANKED, None)
    with torch.no_grad():
        flex, alone = sequence_logps(twin, batch), sequence_logps(model, single)
    torch.testing.assert_close(batch.unflatten(flex.chosen_logps, flex.rejected_logps),
                               single.unflatten(alone.chosen_logps, alone.rejected_logps), rtol=1e-5, atol=1e-5)
