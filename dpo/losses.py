"""The DPO loss family: small pure functions of per-sequence log-probs, behind a registry.

Every loss takes the summed (or, where noted, length-normalised) log-probabilities of the chosen and
rejected answers under the policy and the reference, each of shape ``[B]``, and returns the per-pair loss
``[B]`` before any batch mean. Only torch is imported; nothing here knows about models, batches or
accelerators.

    out = preference_loss("sigmoid", policy_chosen_logps, policy_rejected_logps,
                          ref_chosen_logps, ref_rejected_logps, beta=0.1)
    out.losses.mean().backward()

Conventions follow TRL's ``DPOTrainer`` / ``CPOTrainer`` so that a cross-check against them can pass:

    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)       # the implicit-reward logit
    rewards = beta * (policy - ref)   (detached; beta * policy for reference-free losses)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LossOutput:
    """What :func:`preference_loss` returns; every field has shape ``[B]``.

    ``losses`` carries gradients; the rewards are detached, for logging only.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def _logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """h = (log pi(y_w|x) - log pi(y_l|x)) - (log ref(y_w|x) - log ref(y_l|x)), shape [B]."""
    return (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)


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


def sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    **_: object,
) -> torch.Tensor:
    """DPO's sigmoid loss, optionally label-smoothed (conservative / robust DPO)."""
    # Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7:
    #   L_DPO = -log sigma(beta * h)
    # with label smoothing eps (conservative DPO, Mitchell 2023; TRL's form):
    #   L = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return _smoothed_logsigmoid_loss(beta * h, label_smoothing)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """IPO's squared loss; beta plays the role of the paper's regularisation tau.

    The IPO paper uses log-probs averaged over tokens (TRL does the same for ``ipo``); passing averaged or
    summed log-probs is the caller's decision.
    """
    # Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
    # Eq. 17 (tau = beta):
    #   L_IPO = (h - 1 / (2 * tau))^2
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    **_: object,
) -> torch.Tensor:
    """SLiC's hinge loss on the DPO logit (margin 1, as in TRL's ``hinge``)."""
    # Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", Eq. 1 (the
    # calibration loss), applied to the reference-normalised logit with margin delta = 1 / beta:
    #   L_hinge = max(0, 1 - beta * h)
    h = _logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
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


LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
}

# Losses that never read the reference log-probs; their rewards are beta * policy log-probs.
REFERENCE_FREE: frozenset[str] = frozenset({"simpo"})


def get_loss_fn(name: str) -> LossFn:
    """The loss function registered under ``name``; ValueError listing the valid names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        valid = ", ".join(sorted(LOSSES))
        raise ValueError(f"unknown loss_type {name!r}; valid loss types: {valid}") from None


def _check_inputs(
    loss_type: str,
    tensors: dict[str, torch.Tensor | None],
    *,
    beta: float,
    label_smoothing: float,
) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    if loss_type not in REFERENCE_FREE:
        missing = [name for name in ("ref_chosen_logps", "ref_rejected_logps") if tensors[name] is None]
        if missing:
            raise ValueError(
                f"loss_type {loss_type!r} needs reference log-probs but {', '.join(missing)} is None; "
                f"only reference-free losses ({', '.join(sorted(REFERENCE_FREE))}) accept None"
            )
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"log-prob tensors must all have the same shape [B], got {shapes}")


def preference_loss(
    loss_type: str,
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
) -> LossOutput:
    """Per-pair loss and detached rewards for ``loss_type``, all of shape ``[B]``.

    ``chosen_nll`` is the negative log-likelihood of each chosen answer averaged over its tokens, ``[B]``; it
    is required when ``rpo_alpha`` is set and ignored otherwise.
    """
    loss_fn = get_loss_fn(loss_type)
    tensors = {
        "policy_chosen_logps": policy_chosen_logps,
        "policy_rejected_logps": policy_rejected_logps,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    if rpo_alpha is not None:
        if chosen_nll is None:
            raise ValueError(
                "rpo_alpha is set, so chosen_nll (per-pair NLL of the chosen answer, [B]) is required"
            )
        tensors["chosen_nll"] = chosen_nll
    _check_inputs(loss_type, tensors, beta=beta, label_smoothing=label_smoothing)

    losses = loss_fn(
        policy_chosen_logps,
        policy_rejected_logps,
        ref_chosen_logps,
        ref_rejected_logps,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=simpo_gamma,
    )
    if rpo_alpha is not None and chosen_nll is not None:  # chosen_nll presence was checked above
        # Pang et al. 2024, "Iterative Reasoning Preference Optimization", Eq. 2 style:
        #   L = L_pref + alpha * NLL(y_w | x) / |y_w|
        # the NLL term keeps the chosen answer's likelihood from falling while the margin grows.
        losses = losses + rpo_alpha * chosen_nll

    if loss_type in REFERENCE_FREE:
        chosen_rewards = beta * policy_chosen_logps.detach()
        rejected_rewards = beta * policy_rejected_logps.detach()
    else:
        assert ref_chosen_logps is not None and ref_rejected_logps is not None  # checked by _check_inputs
        # Implicit DPO reward r(x, y) = beta * log(pi(y|x) / ref(y|x)) (Rafailov et al. 2023, Eq. 5).
        chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return LossOutput(losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
