"""The training step of a run on prompts with k scored answers (`--listwise_loss`): one policy forward over all
k answers of every prompt (k branches of one shared prompt where the layout allows), the reference's log-probs of
the same answers, then an objective of `dpo.listwise`.

    collate = make_run_collate(choice, cfg, pad_token_id=pad, datasets=(train_ds, eval_ds))
    out = ranked_forward_and_loss(policy, reference, collate(records, None), cfg)   # .loss, .pair_metrics

A run is ranked when `listwise_loss` is set (pairwise data then counts as k = 2, scores [1, 0]) or the data holds
`responses_ids` (then `listwise_loss` defaults to all_pairs, which at k = 2 is the pairwise loss itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import torch

from dpo.errors import UserError
from dpo.layouts import LayoutChoice, make_collate
from dpo.listwise import PAIRWISE_LISTWISE, listwise_loss, ranking_values
from dpo.logprobs import sequence_logps
from dpo.losses import wants_mean_logps
from dpo.ranked_batch import RankedBatch, make_ranked_collate, max_answers
from dpo.ranked_probe import check_ranked_layout
from dpo.reference import Reference

DEFAULT_LISTWISE = "all_pairs"


@dataclass
class RankedStepOutput:
    loss: torch.Tensor  # scalar, weighted mean over the micro-batch's prompts, for backward
    pair_metrics: dict[str, torch.Tensor | None]  # [B] per-prompt values (dpo.listwise.ranking_values)


def is_ranked(cfg: Any, *splits: datasets.Dataset | None) -> bool:
    return cfg.listwise_loss is not None or any(s is not None and "responses_ids" in s.column_names for s in splits)


def listwise_name(cfg: Any) -> str:
    return cfg.listwise_loss or DEFAULT_LISTWISE


def check_ranked_run(cfg: Any) -> None:
    """What a ranked run cannot do (yet), refused before training with one line."""
    if cfg.use_weighting:
        raise UserError("use_weighting (WPO) weighs pairs by both answers' per-token likelihoods; it is not defined "
                        "for listwise objectives: drop it or use pairwise data without listwise_loss")
    if cfg.ld_alpha is not None:
        raise UserError("ld_alpha (LD-DPO) cuts both answers of a pair at the shorter one's length; it is not defined "
                        "for listwise objectives: drop it or use pairwise data without listwise_loss")
    check_unsplit(cfg)


def check_unsplit(cfg: Any) -> None:
    """k-answer rows are not split: the split and its group-summed log-probs are built for pairs only (training and
    precompute_ref refuse the same way)."""
    if cfg.sequence_parallel_size > 1:
        raise UserError(f"sequence_parallel_size {cfg.sequence_parallel_size} with k-answer data (or listwise_loss) "
                        f"is not supported yet: use sequence_parallel_size 1")


def ranked_summary(cfg: Any, *splits: datasets.Dataset | None) -> str:
    """The log line of a ranked run: its objective and the data's answers per prompt ("pairs" in the other lines
    count prompts)."""
    num_answers = max(max_answers(d) for d in splits if d is not None)
    pairwise = "" if listwise_name(cfg) not in PAIRWISE_LISTWISE else f" of loss_type {cfg.loss_type}"
    default = " (the default on ranked data)" if cfg.listwise_loss is None else ""
    return (f"[dpo] ranked data: up to {num_answers} scored answers per prompt (a 'pair' in these lines is a prompt "
            f"with its answers); listwise_loss {listwise_name(cfg)}{pairwise}{default}")


def make_run_collate(choice: LayoutChoice, cfg: Any, *, pad_token_id: int,
                     datasets_: tuple[datasets.Dataset | None, ...]
                     ) -> Callable[[list[dict[str, Any]], list[float] | None], Any]:
    """The run's collate: pairwise batches as today, or ranked batches with K = the data's most answers."""
    if not is_ranked(cfg, *datasets_):
        return make_collate(choice.layout, pad_token_id=pad_token_id, max_tokens_per_row=cfg.max_tokens_per_row,
                            attention=choice.attention, mask_form=choice.mask_form)
    num_answers = max(max_answers(d) for d in datasets_ if d is not None)
    return make_ranked_collate(choice.layout, num_answers=num_answers, pad_token_id=pad_token_id,
                               max_tokens_per_row=cfg.max_tokens_per_row, attention=choice.attention,
                               mask_form=choice.mask_form)


def ranked_layout(models: list[torch.nn.Module], choice: LayoutChoice, cfg: Any, accelerator: Any, *,
                  pad_token_id: int, datasets_: tuple[datasets.Dataset | None, ...], longest: int) -> LayoutChoice:
    """The run's layout checked on rows of K answers per prompt when the run is ranked with K > 2."""
    if not is_ranked(cfg, *datasets_):
        return choice
    num_answers = max(max_answers(d) for d in datasets_ if d is not None)
    return check_ranked_layout(models, choice, cfg, accelerator, pad_token_id=pad_token_id, num_answers=num_answers,
                               longest=longest)


def answer_logps(model_out: Any, batch: RankedBatch, *, average: bool) -> tuple[torch.Tensor, ...]:
    """(log-probs as the loss sees them, token counts, mean NLL per token, summed NLL), [B, K] each, from one
    `sequence_logps(..., average=False)` over the batch (per-token means computed as `sequence_logps` does)."""
    sums = batch.unflatten(model_out.chosen_logps, model_out.rejected_logps)
    counts = batch.unflatten(model_out.chosen_lengths, model_out.rejected_lengths)
    means = sums / counts.clamp(min=1)
    return (means if average else sums), counts, -means, -means * counts


def ranked_forward_and_loss(policy: torch.nn.Module, reference: Reference, batch: RankedBatch, cfg: Any
                            ) -> RankedStepOutput:
    """Reference log-probs (no grad), one policy forward over every answer of every prompt, the objective."""
    ref_first, ref_second = reference.logps(batch)
    ref = None if ref_first is None else batch.unflatten(ref_first, ref_second)
    average = cfg.average_log_prob or wants_mean_logps(cfg.loss_type)
    out = sequence_logps(policy, batch, average=False, chunk_size=cfg.logits_chunk_size)
    policy_logps, counts, nll, nll_sum = answer_logps(out, batch, average=average)
    scores = batch.scores.to(policy_logps.device)
    weight = batch.pair_weight
    result = listwise_loss(
        listwise_name(cfg), policy_logps, ref, scores, loss_type=cfg.loss_type, beta=cfg.beta,
        lengths=None if average else counts, nll=nll, nll_sum=nll_sum, prompt_weight=weight,
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha,
        loss_weights=cfg.loss_weights, discopop_tau=cfg.discopop_tau, f_divergence_type=cfg.f_divergence_type,
        f_alpha_divergence_coef=cfg.f_alpha_divergence_coef)
    # A weighted mean over the real prompts: every prompt counts once (micro-batch x accumulation invariant).
    loss = (result.losses * weight).sum() / weight.sum().clamp(min=1.0)
    metrics = ranking_values(result.losses, result.rewards, scores, policy_logps, ref)
    return RankedStepOutput(loss=loss, pair_metrics=metrics)
