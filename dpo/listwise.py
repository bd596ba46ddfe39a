"""Objectives over k >= 2 scored answers per prompt: pure functions of per-answer log-probs, like dpo/losses.py.

Inputs are [B, K] tensors: the policy's and the reference's log-probs of each answer, and the answers' scores
(higher is better; NaN where a prompt has fewer than K answers). With h_i = beta * (log pi(y_i|x) - log
pi_ref(y_i|x)) (beta * log pi(y_i|x) without a reference) and the answers in score order, best first (ties kept in
input order):

    all_pairs          mean over the pairs (i, j) with s_i > s_j of the pairwise loss `loss_type` of (i chosen,
                       j rejected); tied pairs are left out. Any loss of dpo/losses.py's registry.
    best_vs_rest       the same over the pairs (best, j), s_best > s_j (the best: the first top-scored answer)
    plackett_luce      -(1/(k-1)) sum_{i=1..k-1} log( exp(h_i) / sum_{j>=i} exp(h_j) ): the Plackett-Luce
                       likelihood of the score order (Rafailov et al. 2023, Appendix A.3; LiPO's listwise DPO,
                       Liu et al. 2024), ties broken by input order
    softmax_negatives  -log sigma( -log sum_{j in N} exp(h_j - h_best) ), N the answers scored below the best: DPO
                       with several negatives (Chen et al. 2024, "On Softmax Direct Preference Optimization")

With k = 2, all_pairs and best_vs_rest are the pairwise loss itself (one pair, a mean of one), and plackett_luce and
softmax_negatives are -log sigma(h_1 - h_2), sigmoid DPO.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from dpo.losses import preference_loss

LISTWISE_LOSSES = ("all_pairs", "best_vs_rest", "plackett_luce", "softmax_negatives")
PAIRWISE_LISTWISE = ("all_pairs", "best_vs_rest")  # the ones that apply `loss_type` to pairs


@dataclass(frozen=True)
class ListwiseOutput:
    """Per-prompt losses [B] (with gradient) and the detached rewards h [B, K] (NaN where no answer)."""

    losses: torch.Tensor
    rewards: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


def score_order(scores: torch.Tensor) -> torch.Tensor:
    """[B, K] long: answer indices best first; ties in input order; absent answers (NaN) last."""
    key = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def scored_pairs(scores: torch.Tensor, *, best_only: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt, better, worse) index tensors of the pairs with s_better > s_worse: for each prompt in order, the
    better answer in score order, then the worse one in score order. `best_only`: the pairs of the first top one."""
    order = score_order(scores)
    ranked = scores.gather(-1, order)  # scores best first, NaN last
    num_answers = scores.shape[-1]
    i, j = torch.triu_indices(num_answers, num_answers, offset=1, device=scores.device)
    better, worse = ranked[:, i], ranked[:, j]  # [B, P]
    keep = better > worse  # False for ties and for any NaN
    if best_only:
        keep = keep & (i == 0)[None]
    prompt, pair = keep.nonzero(as_tuple=True)
    return prompt, order[prompt, i[pair]], order[prompt, j[pair]]


def implicit_rewards(policy: torch.Tensor, ref: torch.Tensor | None, *, beta: float) -> torch.Tensor:
    """h = beta * (policy - ref), or beta * policy without a reference. [B, K], with gradient."""
    return beta * (policy - ref) if ref is not None else beta * policy


def pairwise_over_pairs(loss_type: str | list[str], policy: torch.Tensor, ref: torch.Tensor | None,
                        scores: torch.Tensor, *, best_only: bool, beta: float,
                        lengths: torch.Tensor | None = None, nll: torch.Tensor | None = None,
                        nll_sum: torch.Tensor | None = None, prompt_weight: torch.Tensor | None = None,
                        **loss_options: Any) -> torch.Tensor:
    """all_pairs / best_vs_rest: the mean over each prompt's scored pairs of `preference_loss(loss_type)`. [B]

    `lengths` [B, K] answer token counts (None: log-probs are per-token means), `nll` [B, K] mean NLL per token (for
    rpo_alpha), `nll_sum` [B, K] summed NLL (the sft term), `prompt_weight` [B] (0: a prompt that only fills a
    batch; batch-coupled losses leave it out). Other keyword arguments go to `preference_loss` as they are."""
    prompt, better, worse = scored_pairs(scores, best_only=best_only)

    def pick(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t[prompt, index]

    out = preference_loss(
        loss_type, policy[prompt, better], policy[prompt, worse], pick(ref, better), pick(ref, worse), beta=beta,
        chosen_lengths=pick(lengths, better), rejected_lengths=pick(lengths, worse),
        chosen_nll=pick(nll, better) if loss_options.get("rpo_alpha") is not None else None,
        chosen_nll_sum=pick(nll_sum, better),
        pair_weight=None if prompt_weight is None else prompt_weight[prompt], **loss_options)
    counts = torch.zeros(scores.shape[0], dtype=out.losses.dtype, device=out.losses.device)
    counts = counts.index_add(0, prompt, torch.ones_like(out.losses))
    sums = out.losses.new_zeros(scores.shape[0]).index_add(0, prompt, out.losses)
    # A prompt with one pair (k = 2) keeps its pair's value exactly: x / 1.
    return sums / counts.clamp(min=1)


def plackett_luce_loss(h: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """-(1/(k-1)) sum_{i<k} log softmax(h_i over the answers ranked i and below), in score order. [B]"""
    order = score_order(scores)
    present = ~torch.isnan(scores.gather(-1, order))
    ranked = torch.where(present, h.gather(-1, order), torch.zeros_like(h))
    num_answers = h.shape[-1]
    idx = torch.arange(num_answers, device=h.device)
    # below[b, i, j]: answer j is ranked at or below i and present; j == i always, so no row is empty (finite
    # gradients even for the rows of absent answers, which are left out below).
    below = ((idx[None, :] >= idx[:, None])[None] & present[:, None, :]) | torch.eye(
        num_answers, dtype=torch.bool, device=h.device)[None]
    denominators = torch.logsumexp(torch.where(below, ranked[:, None, :], -math.inf), dim=-1)  # [B, K]
    k = present.sum(-1)
    counted = present & (idx[None] < (k - 1)[:, None])  # positions 1..k-1 of each prompt
    terms = torch.where(counted, ranked - denominators, torch.zeros_like(ranked))
    return -terms.sum(-1) / (k - 1).clamp(min=1).to(h.dtype)


def softmax_negatives_loss(h: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """-log sigma(h_best - log sum_{j scored below the best} exp(h_j)). [B]"""
    order = score_order(scores)
    best = order[:, :1]
    best_score = scores.gather(-1, best)
    negative = scores < best_score  # NaN compares False: absent answers are no negatives
    h_best = h.gather(-1, best).squeeze(-1)
    others = torch.logsumexp(torch.where(negative, h, -math.inf), dim=-1)
    return -F.logsigmoid(h_best - others)


def listwise_loss(name: str, policy: torch.Tensor, ref: torch.Tensor | None, scores: torch.Tensor, *,
                  loss_type: str | list[str], beta: float, lengths: torch.Tensor | None = None,
                  nll: torch.Tensor | None = None, nll_sum: torch.Tensor | None = None,
                  prompt_weight: torch.Tensor | None = None, **loss_options: Any) -> ListwiseOutput:
    """The objective `name` of LISTWISE_LOSSES over [B, K] log-probs; `loss_type` and `loss_options` are the
    pairwise loss's (all_pairs, best_vs_rest)."""
    h = implicit_rewards(policy, ref, beta=beta)
    if name in PAIRWISE_LISTWISE:
        losses = pairwise_over_pairs(loss_type, policy, ref, scores, best_only=name == "best_vs_rest", beta=beta,
                                     lengths=lengths, nll=nll, nll_sum=nll_sum, prompt_weight=prompt_weight,
                                     **loss_options)
    elif name in OBJECTIVES:
        losses = OBJECTIVES[name](h, scores)
    else:
        raise ValueError(f"unknown listwise_loss {name!r}; expected one of {', '.join(LISTWISE_LOSSES)}")
    rewards = torch.where(torch.isnan(scores), torch.full_like(h, math.nan), h).detach()
    return ListwiseOutput(losses=losses, rewards=rewards)


OBJECTIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "plackett_luce": plackett_luce_loss,
    "softmax_negatives": softmax_negatives_loss,
}


# ------------------------------------------------------------------------------------------------ metrics


def kendall_tau_b(rewards: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Kendall's tau-b between each prompt's rewards and scores over its present answers, [B] (NaN where it is
    undefined: every reward tied). tau_b = (C - D) / sqrt((n0 - n_s)(n0 - n_r)), n_s / n_r the pairs tied in scores /
    rewards (scipy.stats.kendalltau's default)."""
    present = ~torch.isnan(scores)
    i, j = torch.triu_indices(scores.shape[-1], scores.shape[-1], offset=1, device=scores.device)
    both = present[:, i] & present[:, j]
    ds = torch.sign(scores[:, i] - scores[:, j]).nan_to_num(0.0)
    dr = torch.sign(rewards[:, i] - rewards[:, j]).nan_to_num(0.0)
    valid = both.to(rewards.dtype)
    concordance = (ds * dr * valid).sum(-1)
    untied_s = ((ds != 0) & both).sum(-1).to(rewards.dtype)
    untied_r = ((dr != 0) & both).sum(-1).to(rewards.dtype)
    return concordance / torch.sqrt(untied_s * untied_r)


def ranking_values(losses: torch.Tensor, rewards: torch.Tensor, scores: torch.Tensor, policy: torch.Tensor,
                   ref: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """Per-prompt values [B] for dpo.metrics.MetricAccumulator; `finish_ranking_metrics` turns the sums/counts into
    ratios after the reduction:

    rewards/accuracies   (pairs ranked right)/(scored pairs), over all scored pairs of all prompts: the pairs'
                         accumulated counts `ranking/pairs_correct` and `ranking/pairs` give it
    ranking/top_accuracy the answer with the highest reward is a top-scored one
    ranking/kendall_tau  Kendall's tau-b between rewards and scores, mean over prompts (a prompt whose rewards are
                         all tied counts 0)
    rewards/rank_r       mean reward of the answer ranked r by score (1 = best), over prompts with an r-th answer
    rewards/chosen, rewards/rejected, rewards/margins: the best and the worst answer's rewards; logps/* the same
    """
    order = score_order(scores)
    ranked_rewards, ranked_scores = rewards.gather(-1, order), scores.gather(-1, order)
    present = ~torch.isnan(ranked_scores)
    k = present.sum(-1)
    last = (k - 1).clamp(min=0)[:, None]
    prompt, better, worse = scored_pairs(scores, best_only=False)
    right = (rewards[prompt, better] > rewards[prompt, worse]).to(rewards.dtype)
    num_prompts = scores.shape[0]
    pairs = rewards.new_zeros(num_prompts).index_add(0, prompt, torch.ones_like(right))
    correct = rewards.new_zeros(num_prompts).index_add(0, prompt, right)
    top = torch.where(present, ranked_rewards, -math.inf).argmax(-1, keepdim=True)
    top_accuracy = (ranked_scores.gather(-1, top) == ranked_scores[:, :1]).squeeze(-1).to(rewards.dtype)
    chosen, rejected = ranked_rewards[:, 0], ranked_rewards.gather(-1, last).squeeze(-1)
    policy_ranked = policy.detach().gather(-1, order)
    values: dict[str, torch.Tensor | None] = {
        "loss": losses,
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": correct,  # a sum for now: finish_ranking_metrics divides by ranking/pairs
        "logps/chosen": policy_ranked[:, 0],
        "logps/rejected": policy_ranked.gather(-1, last).squeeze(-1),
        "logps/accuracies": (policy_ranked[:, 0] > policy_ranked.gather(-1, last).squeeze(-1)).to(rewards.dtype),
        "logratio/chosen": None if ref is None else (policy - ref).detach().gather(-1, order)[:, 0],
        "ranking/pairs": pairs,
        "ranking/top_accuracy": top_accuracy,
        "ranking/kendall_tau": kendall_tau_b(rewards, scores).nan_to_num(0.0),
    }
    for r in range(scores.shape[-1]):
        values[f"rewards/rank_{r + 1}"] = torch.where(present[:, r], ranked_rewards[:, r], 0.0)
        values[f"ranking/with_rank_{r + 1}"] = present[:, r].to(rewards.dtype)
    return values


def finish_ranking_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """After the reduction (means over prompts): pair accuracy over all pairs, rank means over the prompts that
    have the rank; the helper counts are dropped. Metrics of a pairwise run pass through unchanged."""
    if "ranking/pairs" not in metrics:
        return metrics
    pairs = metrics.pop("ranking/pairs")
    metrics["rewards/accuracies"] = metrics["rewards/accuracies"] / pairs if pairs else math.nan
    for name in [n for n in metrics if n.startswith("ranking/with_rank_")]:
        share = metrics.pop(name)
        rank = name.rsplit("_", 1)[1]
        metrics[f"rewards/rank_{rank}"] = metrics[f"rewards/rank_{rank}"] / share if share else math.nan
    return metrics
