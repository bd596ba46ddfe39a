"""The bridge from a forward's log-probs to the loss's inputs: token weighting (LD-DPO, WPO) and the keyword
arguments of `dpo.losses.preference_loss` for a config. Pure torch on the per-token outputs of
`dpo.logprobs.SequenceLogps`; it knows nothing about layouts (every layout scores an answer's tokens in order).

    policy_out = sequence_logps(policy, batch, with_log_sum_sq=cfg.use_weighting)
    chosen, rejected = answer_logps(policy_out, ld_alpha=cfg.ld_alpha)     # [B] each
    out = preference_loss(cfg.loss_type, chosen, rejected, ref_chosen, ref_rejected,
                          **loss_kwargs(cfg, policy_out, batch.pair_weight))
"""

from __future__ import annotations

from typing import Any

import torch

from dpo.logprobs import SequenceLogps
from dpo.losses import wants_mean_logps


def answer_positions(token_seq: torch.Tensor) -> torch.Tensor:
    """0-based position of each scored token within its answer, from the order in which tokens appear. [N]

    Example: token_seq [0, 0, 2, 0, 2] -> [0, 1, 0, 2, 1]."""
    order = torch.sort(token_seq, stable=True).indices
    sorted_seq = token_seq[order]
    index = torch.arange(token_seq.numel(), device=token_seq.device)
    is_first = torch.ones_like(sorted_seq, dtype=torch.bool)
    is_first[1:] = sorted_seq[1:] != sorted_seq[:-1]
    # index of each run's first element, carried forward over the run
    first = torch.cummax(torch.where(is_first, index, torch.zeros_like(index)), dim=0).values
    positions = torch.empty_like(index)
    positions[order] = index - first
    return positions


def _pair_lengths(out: SequenceLogps) -> torch.Tensor:
    return torch.cat([out.chosen_lengths, out.rejected_lengths])


def answer_logps(out: SequenceLogps, *, ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen and rejected answers' log-probs as the loss sees them, [B] each.

    Plain (`out.chosen_logps`, `out.rejected_logps`) unless `ld_alpha` is set. LD-DPO (Liu et al. 2024,
    "Length Desensitization in Direct Preference Optimization", Eq. 9): with l_s = min(|y_w|, |y_l|) the length
    both answers share, log pi(y|x) = sum_{k <= l_s} log p(y_k) + ld_alpha * sum_{k > l_s} log p(y_k), so the
    longer answer's excess tokens count ld_alpha times (1: plain DPO; 0: cut at the shorter answer's length).
    """
    if ld_alpha is None:
        return out.chosen_logps, out.rejected_logps
    if out.token_logps is None or out.token_seq is None:
        raise ValueError("ld_alpha needs per-token log-probs (SequenceLogps.token_logps/token_seq)")
    num_pairs = out.chosen_lengths.shape[0]
    shared = torch.minimum(out.chosen_lengths, out.rejected_lengths).repeat(2)  # [2B]
    positions = answer_positions(out.token_seq).to(shared.dtype)
    weight = torch.where(positions < shared[out.token_seq], 1.0, ld_alpha).to(out.token_logps.dtype)
    sums = out.token_logps.new_zeros(2 * num_pairs).index_add(0, out.token_seq, out.token_logps * weight)
    return sums[:num_pairs], sums[num_pairs:]


@torch.no_grad()
def wpo_weights(out: SequenceLogps) -> torch.Tensor:
    """WPO's per-pair weight w(x, y_w) * w(x, y_l), detached, [B].

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2 with the aligned
    (sampling-normalised) token probability, as TRL computes it: w(x, y) = exp(mean_k [log p(y_k) - log sum_v
    p(v)^2]) over the answer's tokens, with no gradient and no clamping.
    """
    if out.token_logps is None or out.token_seq is None or out.token_log_sum_sq is None:
        raise ValueError("use_weighting needs per-token log-probs and log_sum_sq: sequence_logps(with_log_sum_sq=True)")
    num_pairs = out.chosen_lengths.shape[0]
    aligned = out.token_logps.detach().float() - out.token_log_sum_sq.float()
    sums = aligned.new_zeros(2 * num_pairs).index_add(0, out.token_seq, aligned)
    weights = torch.exp(sums / _pair_lengths(out).float().clamp(min=1.0)).to(out.token_logps.dtype)
    return weights[:num_pairs] * weights[num_pairs:]


def loss_kwargs(cfg: Any, out: SequenceLogps, pair_weight: torch.Tensor | None) -> dict[str, Any]:
    """Keyword arguments of `preference_loss` for the config `cfg` (a TrainConfig) and the policy's forward."""
    averaged = cfg.average_log_prob or wants_mean_logps(cfg.loss_type)
    # Summed NLL of each chosen answer from the plain token log-probs (mean x count), for the sft term.
    chosen_nll_sum = out.chosen_nll * out.chosen_lengths
    return dict(
        beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma, rpo_alpha=cfg.rpo_alpha,
        chosen_nll=out.chosen_nll, loss_weights=cfg.loss_weights, discopop_tau=cfg.discopop_tau,
        f_divergence_type=cfg.f_divergence_type, f_alpha_divergence_coef=cfg.f_alpha_divergence_coef,
        chosen_lengths=None if averaged else out.chosen_lengths,
        rejected_lengths=None if averaged else out.rejected_lengths,
        chosen_nll_sum=chosen_nll_sum, wpo_weights=wpo_weights(out) if cfg.use_weighting else None,
        pair_weight=pair_weight,
    )
