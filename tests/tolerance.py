"""Tolerances for comparing two floating-point computations of the same sums done in another order (chunks,
layouts, packing, thread counts, library versions), derived from the dtype and the number of terms summed rather
than fixed elementwise bounds.

Recursive summation of n terms in a format of unit roundoff u (half the machine epsilon) errs by at most
gamma_n * sum|terms|, gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
2002, eq. 4.4; blocked and pairwise orders do better). Two orders of the same sum therefore differ by at most
2 gamma_n sum|terms|. A chain of reductions (a forward then a backward pass: dot products over the hidden size, the
vocabulary's softmax, the positions a weight gradient adds up) adds its lengths to first order, so `terms` is the
sum of the reduction lengths on the way. An entry that cancels to near zero has a small value but not small terms:
its error follows the terms' scale, for which the largest entry of the tensor stands in (`scale`).

A fixed 1e-5 elementwise bound passes on one machine and fails on another whose BLAS or thread count sums in
another order (issue 22: chunked vs dense head gradients of Phi with 2 threads, 2e-6 of the largest entry on an
entry that nearly cancels). The bounds here are worst cases, typically 10-100x above what is seen, and still
orders of magnitude below what any real mistake produces (a wrong position, mask or chunk: relative errors of 1e-2
and more)."""

from __future__ import annotations

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def reordered_sum_rtol(dtype: torch.dtype, terms: int) -> float:
    """2 gamma_n: the largest relative (to sum|terms|) difference of two orders of a sum of `terms` terms."""
    nu = terms * unit_roundoff(dtype)
    if nu >= 0.5:
        raise ValueError(f"{terms} terms in {dtype}: no useful bound (n u = {nu:.2g})")
    return 2 * nu / (1 - nu)


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor, *, terms: int, scale: float | None = None,
                           msg: str = "") -> None:
    """|actual - expected| <= 2 gamma_n (|expected| + scale) elementwise, in the dtype of `expected`.

    `scale` stands in for the terms' magnitude where entries cancel (default: the largest |expected|)."""
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    rtol = reordered_sum_rtol(expected.dtype, terms)
    reference = expected.detach().abs()
    floor = float(reference.max()) if scale is None and reference.numel() else (scale or 0.0)
    allowed = rtol * (reference + floor)
    excess = (actual.detach() - expected.detach()).abs() - allowed
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or float(excess.flatten()[worst]) <= 0, (
        f"{msg}: differ beyond reordering at flat index {worst}: "
        f"{float(actual.flatten()[worst])} vs {float(expected.flatten()[worst])}, "
        f"allowed {float(allowed.flatten()[worst]):.3g} ({terms} terms summed, rtol {rtol:.3g})")


def model_terms(config: object, *, positions: int, row_length: int) -> int:
    """The lengths of the sums between a decoder's inputs and a log-prob and back to a weight's gradient: per layer
    the hidden size, the MLP's width and the attended positions (`row_length`); the final norm and the vocabulary
    (head, softmax); the `positions` a weight gradient adds up."""
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    width = getattr(config, "intermediate_size", None) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    return positions + getattr(config, "vocab_size") + hidden + layers * (hidden + width + row_length)


def batch_terms(model: torch.nn.Module, batch: object) -> int:
    """`model_terms` of a model's config on a collated batch (`input_ids` [rows, T]): every position of the batch
    can add into a weight's gradient, and a row's positions are what attention sums over."""
    input_ids = getattr(batch, "input_ids")
    return model_terms(model.config, positions=input_ids.numel(), row_length=input_ids.shape[-1])


def assert_scalars_reordered_close(actual: float, expected: float, *, terms: int, scale: float = 0.0,
                                   dtype: torch.dtype = torch.float32, msg: str = "") -> None:
    """One logged value (a loss, a reward, a metric) of two runs whose sums went in another order:
    |actual - expected| <= 2 gamma_n (|expected| + scale)."""
    allowed = reordered_sum_rtol(dtype, terms) * (abs(expected) + scale)
    assert abs(actual - expected) <= allowed, (
        f"{msg}: {actual} vs {expected} differ by {abs(actual - expected):.3g}, beyond reordering "
        f"({allowed:.3g}: {terms} terms summed)")
