"""Per-sequence log-probs of the answers: one forward over the whole batch (chosen and rejected together).

The LM head runs only on scored positions (transformers' boolean `logits_to_keep`), chunk by chunk against the
output embedding (`dpo.lm_head`), so no `[scored positions, vocab]` logits exist in the forward or the backward.
A model whose head `dpo.lm_head` cannot reproduce takes the dense path: its own logits, then `label_logps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo.data import PreferenceBatch
from dpo.lm_head import chunked_head_logps, forward_keeping
from dpo.masks import model_attention_mask
from dpo.sequence_parallel import sum_over_group


@dataclass
class SequenceLogps:
    """Summed log-probs of each answer's tokens and the answers' token counts, all [B].

    `chosen_logps`/`rejected_logps` are sums, or per-token means when the forward was asked for averages.
    `chosen_nll` is the mean negative log-likelihood per chosen token (for the RPO term), always a mean.

    Per-token outputs, for objectives that weight tokens (LD-DPO, WPO; see dpo/objective.py), one entry per scored
    token in the batch's row-major order: `token_logps` [N] (with gradient), `token_seq` [N] (its sequence, as in
    `target_seq`), and, only when asked for, `token_log_sum_sq` [N] = log sum_v p(v)^2 at that position (detached).
    Within one sequence the tokens appear in answer order in every layout (tests/test_objective.py checks it).
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor
    chosen_nll: torch.Tensor
    token_logps: torch.Tensor | None = None
    token_seq: torch.Tensor | None = None
    token_log_sum_sq: torch.Tensor | None = None


def label_logps(logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(logits)[label] for each row of `logits` [N, V], computed in chunks of rows, in fp32."""
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start:start + chunk_size].float()
        picked = chunk.gather(-1, labels[start:start + chunk_size, None]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    if not out:
        return logits.new_zeros((0,), dtype=torch.float32)
    return torch.cat(out)


@torch.no_grad()
def log_sum_sq_probs(logits: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """log sum_v softmax(logits)_v^2 for each row of `logits` [N, V], in fp32 chunks, detached. [N]

    = logsumexp(2 z) - 2 logsumexp(z): the log of the probability that two samples from the row agree, WPO's
    normaliser of a token's probability (Zhou et al. 2024, Eq. 2's aligned weight)."""
    out = []
    for start in range(0, logits.shape[0], chunk_size):
        chunk = logits[start:start + chunk_size].float()
        out.append(torch.logsumexp(2.0 * chunk, dim=-1) - 2.0 * torch.logsumexp(chunk, dim=-1))
    if not out:
        return logits.new_zeros((0,), dtype=torch.float32)
    return torch.cat(out)


def scatter_sequence_logps(
    token_logps: torch.Tensor, token_seq: torch.Tensor, num_pairs: int, *, average: bool, sequence_group: Any = None
) -> SequenceLogps:
    """Sum token log-probs into their 2B sequences (chosen 0..B-1, rejected B..2B-1); with a `sequence_group`,
    this rank's tokens are a slice of each row, and sums and counts are added over the group."""
    sums = token_logps.new_zeros(2 * num_pairs).index_add(0, token_seq, token_logps)
    counts = torch.zeros(2 * num_pairs, dtype=token_logps.dtype, device=token_logps.device)
    counts = counts.index_add(0, token_seq, torch.ones_like(token_logps))
    if sequence_group is not None:
        sums = sum_over_group(sums, sequence_group)
        counts = sum_over_group(counts, sequence_group).detach()
    means = sums / counts.clamp(min=1)
    values = means if average else sums
    return SequenceLogps(
        chosen_logps=values[:num_pairs],
        rejected_logps=values[num_pairs:],
        chosen_lengths=counts[:num_pairs],
        rejected_lengths=counts[num_pairs:],
        chosen_nll=-means[:num_pairs],
        token_logps=token_logps,
        token_seq=token_seq,
    )


def dense_logits(model: torch.nn.Module, inputs: dict, keep: torch.Tensor) -> torch.Tensor:
    """The model's own [N, V] logits of the `keep` positions (they exist, and their gradient in backward)."""
    out, selector = forward_keeping(model, inputs, keep)
    logits = out.logits
    if logits.dim() == 3:  # every position, or the union of the kept columns (`forward_keeping`)
        logits = logits[selector]
    return logits


def dense_head_logps(model: torch.nn.Module, inputs: dict, keep: torch.Tensor, labels: torch.Tensor, *,
                     chunk_size: int) -> torch.Tensor:
    """log p(labels) [N] from the model's own logits of the `keep` positions (the path `dpo.lm_head` replaces)."""
    return label_logps(dense_logits(model, inputs, keep), labels, chunk_size=chunk_size)


def sequence_logps(
    model: torch.nn.Module, batch: PreferenceBatch, *, average: bool = False, chunk_size: int = 1024,
    with_log_sum_sq: bool = False,
) -> SequenceLogps:
    """One forward of `model` on the batch (one per row for a batch of rows run `alone`); log-probs of the answer
    tokens per sequence.

    `use_cache=False` matters beyond memory: with a KV cache present transformers ignores the packed position ids
    and a packed forward would attend across sequences.
    """
    keep = batch.target_seq >= 0  # the scored positions, in row-major order
    if batch.alone:  # row by row, each cut to its real tokens: exactly `model(ids)` of each sequence by itself
        lengths = (batch.attention_mask != 0).sum(-1).tolist()
        parts = [_token_logps(model, dict(input_ids=batch.input_ids[r:r + 1, :n], use_cache=False),
                              keep[r:r + 1, :n], batch.target_ids[r:r + 1, :n][keep[r:r + 1, :n]],
                              chunk_size=chunk_size, with_log_sum_sq=with_log_sum_sq)
                 for r, n in enumerate(lengths)]
        token_logps = torch.cat([p[0] for p in parts])
        log_sum_sq = torch.cat([p[1] for p in parts]) if with_log_sum_sq else None
    else:
        inputs = dict(input_ids=batch.input_ids, attention_mask=model_attention_mask(batch.attention_mask),
                      position_ids=batch.position_ids, use_cache=False)
        token_logps, log_sum_sq = _token_logps(model, inputs, keep, batch.target_ids[keep], chunk_size=chunk_size,
                                               with_log_sum_sq=with_log_sum_sq)
    out = scatter_sequence_logps(token_logps, batch.target_seq[keep], batch.num_pairs, average=average,
                                 sequence_group=batch.sequence_group)
    out.token_log_sum_sq = log_sum_sq
    return out


def _token_logps(model: torch.nn.Module, inputs: dict, keep: torch.Tensor, labels: torch.Tensor, *,
                 chunk_size: int, with_log_sum_sq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label) [N] of the `keep` positions of one forward, and log sum_v p(v)^2 [N] when asked for."""
    if with_log_sum_sq:  # WPO's per-token normaliser needs every logit of the scored positions: the dense head
        logits = dense_logits(model, inputs, keep)
        return label_logps(logits, labels, chunk_size=chunk_size), log_sum_sq_probs(logits, chunk_size=chunk_size)
    token_logps = chunked_head_logps(model, inputs, keep, labels, chunk_size=chunk_size)
    if token_logps is None:  # a head dpo.lm_head cannot reproduce
        token_logps = dense_head_logps(model, inputs, keep, labels, chunk_size=chunk_size)
    return token_logps, None
