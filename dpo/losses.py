"""The DPO loss family: small pure functions of per-sequence log-probs, behind a registry.

Every loss takes the summed (or, where noted, length-normalised) log-probabilities of the chosen and
rejected answers under the policy and the reference, each of shape ``[B]``, and returns the per-pair loss
``[B]`` before any batch mean. Only torch is imported; nothing here knows about models, batches or
accelerators.

    out = preference_loss("sigmoid", policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps, beta=0.1)
    out.losses.mean().backward()

    # a weighted mix (MPO style): the per-pair total is the weighted sum of the components
    out = preference_loss(["sigmoid", "bco_pair", "sft"], ..., loss_weights=[0.8, 0.2, 1.0],
                          chosen_lengths=..., rejected_lengths=..., chosen_nll_sum=...)
    out.components["bco_pair"]  # [B], before its weight

Names, hyper-parameters and definitions follow TRL 1.16's ``DPOTrainer`` (and ``CPOTrainer`` for SimPO) so that a
cross-check against it can pass (tests/test_trl_crosscheck_losses.py):

    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)       # the implicit-reward logit
    rewards = beta * (policy - ref)   (detached; beta * policy without a reference, and for SimPO)

Each registered loss declares its nature in its :class:`LossSpec`, beside the function: whether it needs a
reference, whether it wants per-token mean log-probs (SimPO), whether it reads the f-divergence scores, whether its
per-pair values depend on the whole batch, and the hyper-parameter checks it needs. The config and the trainer ask
the registry (:func:`reference_free`, :func:`wants_mean_logps`, :func:`check_objective`), never a loss name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class LossOutput:
    """What :func:`preference_loss` returns; every tensor has shape ``[B]``.

    ``losses`` carries gradients; the rewards are detached, for logging only. ``components`` holds each loss of a
    mix, per pair, before its weight (after WPO weighting when that is on).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    components: dict[str, torch.Tensor] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ helpers


def _logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)), shape [B]."""
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


def f_divergence_score(logratio: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f'(u) at u = pi/ref, from log u: the reward shape of f-DPO for the divergence `f_divergence_type`.

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with Diverse Divergence
    Constraints", Theorem 1: the optimal policy gives r(x, y) = beta * f'(pi(y|x) / ref(y|x)) + const, and the loss
    is DPO's with log u replaced by f'(u). Table 1's derivatives (constants that cancel in chosen - rejected are
    dropped):
        reverse KL  f'(u) = log u          forward KL  f'(u) = 1 - 1/u
        JS          f'(u) = log(2u / (1 + u)) = log 2 + log sigma(log u)
        alpha       f'(u) = (u^(alpha-1) - 1) / (alpha - 1)   (TRL's form; log u in the limit alpha -> 1)
    """
    if f_divergence_type == "reverse_kl":
        return logratio
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-logratio)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratio
        # The exponent is capped (in fp32) so that exp stays finite once cast back to the input's dtype.
        cap = 11.0 if logratio.dtype == torch.float16 else 80.0
        t = ((alpha - 1.0) * logratio).float().clamp(max=cap)
        return ((torch.exp(t) - 1.0).to(logratio.dtype)) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCES)}")


def _scores(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    f_divergence_type: str,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """f'(pi/ref) of the chosen and of the rejected answer, [B] each."""
    return (f_divergence_score(policy_chosen_logps - ref_chosen_logps, f_divergence_type, alpha),
            f_divergence_score(policy_rejected_logps - ref_rejected_logps, f_divergence_type, alpha))


def _delta(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
) -> torch.Tensor:
    """The DPO logit h under reverse KL; f'(u_w) - f'(u_l) under another f-divergence. [B]"""
    if f_divergence_type == "reverse_kl":
        return _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    return chosen - rejected


def _per_token(value: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """value / answer length (at least 1); unchanged without lengths (the inputs are already per-token means)."""
    return value if lengths is None else value / lengths.clamp(min=1.0)


def _smoothed_logsigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) * log sigma(z) - eps * log sigma(-z).

    With eps the probability that a preference label is flipped, this is the expected loss under label noise
    (conservative DPO; TRL's "robust" form). ``F.logsigmoid`` keeps it finite for large |z|.
    """
    loss = -F.logsigmoid(z)
    if label_smoothing:
        # Skipped at eps = 0 so that the plain loss is computed exactly, not as (1 - 0) * x + 0 * y.
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def _sorted_difference(a: torch.Tensor, b: torch.Tensor, pair_weight: torch.Tensor | None) -> torch.Tensor:
    """sort(a) - sort(b) over the real pairs (weight > 0), placed at the real pairs' indices; 0 at padding pairs.

    Padding pairs (weight 0, which only fill the last eval batch) must not enter the order statistics."""
    if pair_weight is None or bool((pair_weight > 0).all()):
        return torch.sort(a, dim=0).values - torch.sort(b, dim=0).values
    real = pair_weight > 0
    out = torch.zeros_like(a)
    out[real] = torch.sort(a[real], dim=0).values - torch.sort(b[real], dim=0).values
    return out


# ------------------------------------------------------------------------------------------------ the losses
# Every function: (policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta, ...) -> [B].
# Keyword hyper-parameters a loss does not use are accepted and ignored (**_), so a mix passes one set to all.


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """DPO's sigmoid loss, optionally label-smoothed (conservative DPO; TRL 1.16's sigmoid has no smoothing)."""
    # Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
    #   L_DPO = -log sigma(beta * h)
    # with label smoothing eps (conservative DPO, Mitchell 2023):
    #   L = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)
    h = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    return _smoothed_logsigmoid_loss(beta * h, label_smoothing)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """IPO's squared loss on per-token log-ratios; beta plays the role of the paper's regularisation tau.

    Each answer's log-ratio is divided by its token count (the IPO authors' choice, and TRL's); without lengths
    the inputs are taken to be per-token means already.
    """
    # Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    # Eq. 17 (tau = beta):
    #   L_IPO = (h - 1 / (2 * tau))^2,  h on per-token log-ratios
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    h = _per_token(chosen, chosen_lengths) - _per_token(rejected, rejected_lengths)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """SLiC's hinge loss on the DPO logit (margin 1, as in TRL's ``hinge``)."""
    # Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 1 (the
    # calibration loss), applied to the reference-normalised logit with margin delta = 1 / beta:
    #   L_hinge = max(0, 1 - beta * h)
    h = _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    return torch.relu(1.0 - beta * h)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    simpo_gamma: float,
    label_smoothing: float = 0.0,
    **_: object,
) -> torch.Tensor:
    """SimPO: reference-free, with a target reward margin gamma.

    The policy log-probs must already be length-normalised (summed log-prob divided by the number of answer
    tokens); that is the caller's job, this function only sees per-sequence numbers. ``ref_*`` are ignored and
    may be None.
    """
    # Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward", Eq. 6:
    #   L_SimPO = -log sigma(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma)
    # with the same label smoothing as DPO (TRL's CPOTrainer, loss_type="simpo").
    z = beta * (policy_chosen_logps - policy_rejected_logps) - simpo_gamma
    return _smoothed_logsigmoid_loss(z, label_smoothing)


def exo_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """EXO for a pair: the reverse KL from the model's preference to the (1 - eps, eps)-smoothed label."""
    # Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16 with K = 2:
    #   q = softmax(beta * [r_w, r_l]) = (sigma(z), sigma(-z)),  p = (1 - eps, eps),  z = beta * h
    #   L_EXO = KL(q || p) = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)
    z = beta * _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    log_q_w, log_q_l = F.logsigmoid(z), F.logsigmoid(-z)
    return (torch.sigmoid(z) * (log_q_w - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (log_q_l - math.log(label_smoothing)))


def nca_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """NCA for a pair: raises the chosen answer's absolute reward, not only the margin."""
    # Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards", Eq. 10 (K = 2,
    # reward r = beta * log(pi / ref)):
    #   L_NCA = -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """rDPO: an unbiased estimate of the clean-label loss when each label is flipped with probability eps."""
    # Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy Feedback", Eq. 8:
    #   L = [(1 - eps) * (-log sigma(beta * h)) - eps * (-log sigma(-beta * h))] / (1 - 2 eps)
    z = beta * _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """BCO on pairs: the chosen answer classified as good, the rejected as bad, each on its own reward.

    TRL 1.16 has no running reward mean (delta) in this pair form, so neither has this: it is stateless.
    """
    # Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment", Eq. 7 with the
    # reward shift delta = 0:
    #   L_BCO = -log sigma(r_w) - log sigma(-r_l),  r = beta * log(pi / ref)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(r_w) - F.logsigmoid(-r_l)


def sppo_hard_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """SPPO with hard win probabilities (1 for the chosen answer, 0 for the rejected)."""
    # Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", Eq. 4.7 with
    # P(y_w wins) = 1, P(y_l wins) = 0 and eta = 1 / beta:
    #   L = (log(pi_w / ref_w) - 1 / (2 beta))^2 + (log(pi_l / ref_l) + 1 / (2 beta))^2
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    return (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2


def aot_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    pair_weight: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """AOT (paired): the batch's policy log-ratios, sorted, must dominate the reference's, sorted.

    Batch-coupled: value i belongs to an order statistic, not to pair i; only the mean is meaningful.
    """
    # Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport", Eq. 9 (paired,
    # logistic relaxation of first-order stochastic dominance, smoothed like DPO):
    #   L = mean_i -log sigma(beta * (sort(pi_w - pi_l)_i - sort(ref_w - ref_l)_i))
    delta = _sorted_difference(policy_chosen_logps - policy_rejected_logps, ref_chosen_logps - ref_rejected_logps,
                               pair_weight)
    return _smoothed_logsigmoid_loss(beta * delta, label_smoothing)


def aot_unpaired_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    pair_weight: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """AOT (unpaired): the chosen answers' log-ratios, sorted, must dominate the rejected answers', sorted."""
    # Melnyk et al. 2024, Eq. 8 (unpaired): L = mean_i -log sigma(beta * (sort(u_w)_i - sort(u_l)_i)),
    # u = log(pi / ref); batch-coupled like aot.
    delta = _sorted_difference(policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps,
                               pair_weight)
    return _smoothed_logsigmoid_loss(beta * delta, label_smoothing)


def apo_zero_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """APO-zero: for chosen answers better than the model's own; raises chosen, lowers rejected likelihood."""
    # D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions", Eq. 7:
    #   L = 1 - sigma(r_w) + sigma(r_l),  r = beta * log(pi / ref)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    return (1.0 - torch.sigmoid(r_w)) + torch.sigmoid(r_l)


def apo_down_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """APO-down: for chosen answers worse than the model's own; lowers both, the rejected one more."""
    # D'Oosterlinck et al. 2024, Eq. 8:
    #   L = sigma(r_w) + 1 - sigma(r_w - r_l),  r = beta * log(pi / ref)
    r_w = beta * (policy_chosen_logps - ref_chosen_logps)
    r_l = beta * (policy_rejected_logps - ref_rejected_logps)
    return torch.sigmoid(r_w) + (1.0 - torch.sigmoid(r_w - r_l))


def discopop_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    discopop_tau: float,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """DiscoPOP (log-ratio modulated loss): a blend of the logistic and the exponential loss."""
    # Chan et al. 2024, "Discovering Preference Optimization Algorithms with and for Large Language Models", Eq. 5:
    #   z = beta * h,  m = sigma(z / tau),  L = (1 - m) * (-log sigma(z)) + m * exp(-z)
    z = beta * _delta(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    mix = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1.0 - mix) + torch.exp(-z) * mix


def sft_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    chosen_nll_sum: torch.Tensor,
    chosen_lengths: torch.Tensor,
    pair_weight: torch.Tensor | None = None,
    **_: object,
) -> torch.Tensor:
    """The NLL of the chosen answers, averaged over all their tokens in the batch (TRL's ``sft`` term).

    Batch-coupled: value i is pair i's summed NLL scaled so that the (pair-weighted) mean over the batch is the
    token-weighted mean, -sum_i w_i log pi(y_w,i) / sum_i w_i |y_w,i|. Uses the plain token log-probs (no LD-DPO
    weighting), given as ``chosen_nll_sum`` with the token counts ``chosen_lengths``.
    """
    # Xiao et al. 2024 (MPO, "Mixed Preference Optimization"), the generation loss L_gen = -log pi(y_w|x) / |y_w|,
    # averaged over tokens, mixed with the preference losses by weight.
    weight = torch.ones_like(chosen_nll_sum) if pair_weight is None else pair_weight.to(chosen_nll_sum.dtype)
    tokens = (weight * chosen_lengths).sum().clamp(min=1.0)
    return chosen_nll_sum * (weight.sum() / tokens)


def sigmoid_norm_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    **_: object,
) -> torch.Tensor:
    """DPO's sigmoid loss on per-token log-ratios (each answer's log-ratio divided by its length)."""
    # Rafailov et al. 2023, Eq. 7 on length-normalised implicit rewards (as in Meng et al. 2024, SimPO, Eq. 4,
    # but keeping the reference): L = -log sigma(beta * (u_w / |y_w| - u_l / |y_l|)),  u = log(pi / ref)
    chosen, rejected = _scores(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               f_divergence_type, f_alpha_divergence_coef)
    return -F.logsigmoid(beta * (_per_token(chosen, chosen_lengths) - _per_token(rejected, rejected_lengths)))


# ------------------------------------------------------------------------------------------------ the registry

Check = Callable[[dict[str, float | str | bool | None]], str | None]


def _needs_positive_label_smoothing(hp: dict[str, float | str | bool | None]) -> str | None:
    eps = float(hp.get("label_smoothing") or 0.0)  # the shared bound eps < 0.5 is checked for every loss
    return None if eps > 0 else f"needs 0 < label_smoothing < 0.5, got {eps}"


def _needs_positive_discopop_tau(hp: dict[str, float | str | bool | None]) -> str | None:
    tau = float(hp.get("discopop_tau") or 0.0)
    return None if tau > 0 else f"needs discopop_tau > 0, got {tau}"


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and its nature, declared beside it.

    reference_free: never reads the reference log-probs (the run can skip the reference).
    mean_logps:     wants per-token mean policy log-probs (SimPO); cannot be mixed with losses on summed ones.
    f_divergence:   reads f'(pi/ref), so `f_divergence_type` other than reverse_kl applies (TRL's supported set).
    batch_coupled:  per-pair values depend on the whole batch (sorting, batch token means); only the mean is
                    meaningful, and WPO's per-pair weights would be misaligned when it sorts.
    wpo:            WPO weighting is defined for it.
    checks:         hyper-parameter checks; each returns a reason or None.
    """

    fn: LossFn
    paper: str
    reference_free: bool = False
    mean_logps: bool = False
    f_divergence: bool = False
    batch_coupled: bool = False
    wpo: bool = True
    checks: tuple[Check, ...] = ()


REGISTRY: dict[str, LossSpec] = {
    "sigmoid": LossSpec(sigmoid_loss, "Rafailov et al. 2023 (DPO), Eq. 7", f_divergence=True),
    "hinge": LossSpec(hinge_loss, "Zhao et al. 2023 (SLiC-HF), Eq. 1", f_divergence=True),
    "ipo": LossSpec(ipo_loss, "Azar et al. 2023 (IPO), Eq. 17", f_divergence=True),
    "exo_pair": LossSpec(exo_pair_loss, "Ji et al. 2024 (EXO), Eq. 16", f_divergence=True,
                         checks=(_needs_positive_label_smoothing,)),
    "nca_pair": LossSpec(nca_pair_loss, "Chen et al. 2024 (NCA), Eq. 10"),
    "robust": LossSpec(robust_loss, "Chowdhury et al. 2024 (rDPO), Eq. 8", f_divergence=True),
    "bco_pair": LossSpec(bco_pair_loss, "Jung et al. 2024 (BCO), Eq. 7"),
    "sppo_hard": LossSpec(sppo_hard_loss, "Wu et al. 2024 (SPPO), Eq. 4.7"),
    "aot": LossSpec(aot_loss, "Melnyk et al. 2024 (AOT), Eq. 9", batch_coupled=True, wpo=False),
    "aot_unpaired": LossSpec(aot_unpaired_loss, "Melnyk et al. 2024 (AOT), Eq. 8", batch_coupled=True, wpo=False),
    "apo_zero": LossSpec(apo_zero_loss, "D'Oosterlinck et al. 2024 (APO), Eq. 7"),
    "apo_down": LossSpec(apo_down_loss, "D'Oosterlinck et al. 2024 (APO), Eq. 8"),
    "discopop": LossSpec(discopop_loss, "Chan et al. 2024 (DiscoPOP), Eq. 5", f_divergence=True,
                         checks=(_needs_positive_discopop_tau,)),
    "sft": LossSpec(sft_loss, "Xiao et al. 2024 (MPO), generation loss", reference_free=True, f_divergence=True,
                    batch_coupled=True, wpo=False),
    "sigmoid_norm": LossSpec(sigmoid_norm_loss, "Rafailov et al. 2023, Eq. 7 on per-token log-ratios",
                             f_divergence=True),
    "simpo": LossSpec(simpo_loss, "Meng et al. 2024 (SimPO), Eq. 6", reference_free=True, mean_logps=True),
}

LOSSES: dict[str, LossFn] = {name: spec.fn for name, spec in REGISTRY.items()}

# Losses that never read the reference log-probs.
REFERENCE_FREE: frozenset[str] = frozenset(name for name, spec in REGISTRY.items() if spec.reference_free)


def get_loss_fn(name: str) -> LossFn:
    """The loss function registered under ``name``; ValueError listing the valid names otherwise."""
    return _spec(name).fn


def _spec(name: str) -> LossSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(REGISTRY))
        raise ValueError(f"unknown loss_type {name!r}; valid loss types: {valid}") from None


def as_loss_list(loss_type: str | Sequence[str]) -> list[str]:
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def reference_free(loss_type: str | Sequence[str]) -> bool:
    """True when no loss of the mix reads the reference."""
    return all(_spec(name).reference_free for name in as_loss_list(loss_type))


def wants_mean_logps(loss_type: str | Sequence[str]) -> bool:
    """True when the policy log-probs must be per-token means (SimPO)."""
    return any(_spec(name).mean_logps for name in as_loss_list(loss_type))


def _hyper_parameter_problems(*, beta: float, label_smoothing: float) -> list[str]:
    """The bounds every loss shares, defined once: `check_objective` (config time) and `preference_loss` (a direct
    call of the library) both ask here. Per-loss bounds are the `LossSpec.checks`."""
    problems = []
    if not beta > 0:
        problems.append(f"beta: must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:  # 0.5 would make chosen and rejected interchangeable
        problems.append(f"label_smoothing: must be in [0, 0.5), got {label_smoothing}")
    return problems


def check_objective(
    loss_type: str | Sequence[str],
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
) -> None:
    """Validate a loss (or mix) with its hyper-parameters once; ValueError with every problem in one message."""
    names = as_loss_list(loss_type)
    if not names:
        raise ValueError("loss_type: give at least one loss")
    for name in names:
        _spec(name)
    problems = []
    if len(set(names)) != len(names):
        problems.append(f"loss_type lists a loss twice: {names}")
    if loss_weights is not None:
        if len(loss_weights) != len(names):
            problems.append(f"loss_weights has {len(loss_weights)} values for {len(names)} losses {names}")
        elif not all(math.isfinite(w) for w in loss_weights):
            problems.append(f"loss_weights must be finite numbers, got {list(loss_weights)}")
    problems += _hyper_parameter_problems(beta=beta, label_smoothing=label_smoothing)
    hp: dict[str, float | str | bool | None] = {"label_smoothing": label_smoothing, "discopop_tau": discopop_tau}
    for name in names:
        for check in _spec(name).checks:
            reason = check(hp)
            if reason:
                problems.append(f"loss_type {name!r} {reason}")
    if len(names) > 1 and wants_mean_logps(names):
        problems.append(f"{[n for n in names if _spec(n).mean_logps]} work on per-token mean log-probs and cannot be "
                        f"mixed with other losses")
    if f_divergence_type not in F_DIVERGENCES:
        problems.append(f"f_divergence_type {f_divergence_type!r} is not one of {', '.join(F_DIVERGENCES)}")
    elif f_divergence_type != "reverse_kl":
        unsupported = [n for n in names if not _spec(n).f_divergence]
        if unsupported:
            supported = sorted(n for n, s in REGISTRY.items() if s.f_divergence)
            problems.append(f"f_divergence_type {f_divergence_type!r} is defined only for {', '.join(supported)}, "
                            f"not {', '.join(unsupported)}")
    if not math.isfinite(f_alpha_divergence_coef):
        problems.append(f"f_alpha_divergence_coef must be finite, got {f_alpha_divergence_coef}")
    if use_weighting:
        no_wpo = [n for n in names if not _spec(n).wpo]
        if no_wpo:
            problems.append(f"use_weighting (WPO) is not defined for {', '.join(no_wpo)}: their per-pair values are "
                            f"batch-coupled, so per-pair weights would be misaligned")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        problems.append(f"ld_alpha must be in [0, 1], got {ld_alpha}")
    if problems:
        raise ValueError("; ".join(problems))


def _check_inputs(
    names: list[str],
    tensors: dict[str, torch.Tensor | None],
    *,
    beta: float,
    label_smoothing: float,
) -> None:
    problems = _hyper_parameter_problems(beta=beta, label_smoothing=label_smoothing)
    if problems:
        raise ValueError("; ".join(problems))
    for name in names:
        if _spec(name).reference_free:
            continue
        missing = [key for key in ("ref_chosen_logps", "ref_rejected_logps") if tensors[key] is None]
        if missing:
            raise ValueError(
                f"loss_type {name!r} needs reference log-probs but {', '.join(missing)} is None; "
                f"only reference-free losses ({', '.join(sorted(REFERENCE_FREE))}) accept None"
            )
    if "sft" in names:
        missing = [key for key in ("chosen_nll_sum", "chosen_lengths") if tensors.get(key) is None]
        if missing:
            raise ValueError(f"loss_type 'sft' needs {', '.join(missing)} (the chosen answers' summed NLL and "
                             f"token counts, [B])")
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"log-prob tensors must all have the same shape [B], got {shapes}")


def preference_loss(
    loss_type: str | Sequence[str],
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    rpo_alpha: float | None = None,
    chosen_nll: torch.Tensor | None = None,
    loss_weights: Sequence[float] | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll_sum: torch.Tensor | None = None,
    wpo_weights: torch.Tensor | None = None,
    pair_weight: torch.Tensor | None = None,
) -> LossOutput:
    """Per-pair loss and detached rewards for ``loss_type`` (a name or a list mixed by ``loss_weights``), [B] each.

    ``chosen_nll`` is the negative log-likelihood of each chosen answer averaged over its tokens, ``[B]``; it
    is required when ``rpo_alpha`` is set and ignored otherwise. ``chosen_lengths``/``rejected_lengths`` are the
    answers' token counts (length-normalised losses divide by them; None: the log-probs are means already).
    ``wpo_weights`` ([B], detached) multiply every component (WPO). ``pair_weight`` ([B]) marks padding pairs with
    0, which the batch-coupled losses (``aot``, ``aot_unpaired``, ``sft``) leave out of their batch statistics.
    """
    names = as_loss_list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} values for {len(names)} losses {names}")
    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
        "chosen_lengths": chosen_lengths,
        "rejected_lengths": rejected_lengths,
        "chosen_nll_sum": chosen_nll_sum,
        "wpo_weights": wpo_weights,
    }
    if rpo_alpha is not None:
        if chosen_nll is None:
            raise ValueError(
                "rpo_alpha is set, so chosen_nll (per-pair NLL of the chosen answer, [B]) is required"
            )
        tensors["chosen_nll"] = chosen_nll
    _check_inputs(names, tensors, beta=beta, label_smoothing=label_smoothing)

    hyper = dict(beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau,
                 f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                 chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll_sum=chosen_nll_sum,
                 pair_weight=pair_weight)
    components: dict[str, torch.Tensor] = {}
    losses: torch.Tensor | None = None
    for name, weight in zip(names, weights):
        value = _spec(name).fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               **hyper)
        if wpo_weights is not None:
            # Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2: each pair's
            # loss is weighted by how likely the policy is to produce it (weights computed and detached upstream).
            value = value * wpo_weights
        components[name] = value
        # A single loss keeps its exact value (no multiplication by 1.0).
        term = value if len(names) == 1 and weight == 1.0 else weight * value
        losses = term if losses is None else losses + term
    assert losses is not None  # names is never empty
    if rpo_alpha is not None and chosen_nll is not None:  # chosen_nll presence was checked above
        # Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 2 style:
        #   L = L_pref + alpha * NLL(y_w | x) / |y_w|
        # the NLL term keeps the chosen answer's likelihood from falling while the margin grows.
        losses = losses + rpo_alpha * chosen_nll

    if ref_chosen_logps is None or ref_rejected_logps is None or wants_mean_logps(names):
        # SimPO's reward is beta times the mean policy log-prob (Meng et al. 2024, Eq. 4); without a reference,
        # the policy log-prob is all there is.
        chosen_rewards = beta * policy_chosen_logps.detach()
        rejected_rewards = beta * policy_rejected_logps.detach()
    else:
        # Implicit DPO reward r(x, y) = beta * log(pi(y|x) / ref(y|x)) (Rafailov et al. 2023, Eq. 5).
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
                      components=components)
