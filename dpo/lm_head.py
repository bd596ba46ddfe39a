"""Answer-token log-probs from the LM head without ever holding `[scored positions, vocab]` logits.

    token_logps = chunked_head_logps(model, inputs, keep, labels, chunk_size=256)  # [N] fp32, or None

The model's own forward runs (through any DDP/DeepSpeed/peft wrapper, with the caller's kwargs unchanged) with a
pre-hook on its output embedding: the hook keeps the head's input, the final hidden states of the scored positions
[N, H] (transformers' boolean `logits_to_keep` selects them), and hands the head an empty tensor instead. Then
`log p(label) = logit[label] - logsumexp(logits)` is taken `chunk_size` rows at a time by calling the head module
itself - so a bias, tied embeddings, LoRA on the head, a quantised head and the autocast dtype the model's forward
ran under all apply as they do inside the model - followed by what the model does to logits after its head
(`final_logit_softcapping`, Cohere's `logit_scale`, Granite's `logits_scaling`). With gradients, backward
recomputes each chunk's `[chunk, V]` logits rather than keeping them, so the extra memory of forward and backward is
O(chunk x V) instead of O(N x V). A plain `nn.Linear` head outside autocast (the usual case) is one autograd node
(`_LinearHeadLogps`): one `[chunk, V]` buffer at a time and the weight's gradient accumulated in place. Any other
head (LoRA on it, quantised, under autocast) runs each chunk through autograd under `checkpoint`, which holds a
chunk's logits, their gradient and a `[V, H]` weight-gradient temporary per chunk at once.

A head this cannot reproduce is detected, not assumed: once per model, a probe of a few tokens compares these
logits with the model's own; on a mismatch (or under ZeRO-3, where the head weight is partitioned) this returns
None, says why once, and the caller takes the model's dense logits instead.
"""

from __future__ import annotations

import sys
import weakref
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

PROBE_TOKENS = 8
_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


class _LabelLogp(torch.autograd.Function):
    """logits [n, V] (any float dtype), labels [n] -> log softmax(logits)[label] in fp32. Backward builds one
    [n, V] gradient in place (softmax scaled by -grad, plus grad at the label) instead of autograd's several."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits32 = logits.float()
        lse = torch.logsumexp(logits32, dim=-1)
        ctx.save_for_backward(logits, labels, lse)
        return logits32.gather(-1, labels[:, None]).squeeze(-1) - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, labels, lse = ctx.saved_tensors
        out = logits.float().sub(lse[:, None]).exp_().mul_(-grad[:, None])  # d/dlogits of -lse
        out.scatter_add_(-1, labels[:, None], grad[:, None])  # d/dlogits of logit[label]
        return out.to(logits.dtype), None


class _LinearHeadLogps(torch.autograd.Function):
    """The whole head of a plain `nn.Linear` in one autograd node: hidden [N, H], weight [V, H], bias [V] or None,
    labels [N] -> log softmax(transform(hidden W^T + b))[label] [N] fp32, `chunk_size` rows at a time in forward
    and in backward. Backward recomputes each chunk's logits, turns them into their gradient in place, and adds
    that chunk's share into one weight-gradient buffer (`addmm_`), so its extra memory is one [chunk, V] buffer
    and the [V, H] gradient itself - not a [V, H] temporary per chunk plus a chunk's logits, their gradient and
    the checkpoint's copies, as autograd through `checkpoint` needs."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                labels: torch.Tensor, chunk_size: int, transform: Callable[[torch.Tensor], torch.Tensor] | None
                ) -> torch.Tensor:
        out = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = torch.nn.functional.linear(hidden[rows], weight, bias)
            if transform is not None:
                logits = transform(logits)
            logits = logits.float()  # a fresh tensor: the logsumexp below works in its buffer
            picked = logits.gather(-1, labels[rows, None]).squeeze(-1)
            top = logits.amax(dim=-1, keepdim=True)
            lse[rows] = logits.sub_(top).exp_().sum(dim=-1).log_().add_(top.squeeze(-1))
            out[rows] = picked - lse[rows]
            del logits  # before the next chunk's logits exist: one [chunk, V] buffer at a time
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.transform = chunk_size, transform
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        grad_bias = torch.zeros_like(bias) if need_bias and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            h, g = hidden[rows], grad[rows, None]
            with torch.no_grad():
                z = torch.nn.functional.linear(h, weight, bias)
            if ctx.transform is None:  # d/dz of z[label] - lse(z), built in z's own buffer
                dz = z.float().sub_(lse[rows, None]).exp_().mul_(-g).scatter_add_(-1, labels[rows, None], g)
            else:  # through the transform (softcapping, scales) by autograd, one chunk at a time
                with torch.enable_grad():
                    z.requires_grad_(True)
                    picked = _LabelLogp.apply(ctx.transform(z), labels[rows])
                    (dz,) = torch.autograd.grad(picked, z, g.squeeze(-1))
            dz = dz.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(dz, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), h)
            if grad_bias is not None:
                grad_bias += dz.sum(0)
            del z, dz  # before the next chunk's logits exist
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _plain_linear_head(head: torch.nn.Module, hidden: torch.Tensor, autocast: dict[str, Any]) -> bool:
    """Whether `head(hidden)` is exactly `F.linear(hidden, head.weight, head.bias)`: an `nn.Linear` itself (not a
    subclass: LoRA, quantised and DeepSpeed layers are), without hooks, outside autocast, in the weight's dtype."""
    return (type(head) is torch.nn.Linear and not autocast["enabled"] and hidden.dtype == head.weight.dtype
            and not (head._forward_hooks or head._forward_pre_hooks or torch.nn.modules.module._global_forward_hooks
                     or torch.nn.modules.module._global_forward_pre_hooks))


def logit_transform(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's forward does to the head's output before returning logits; None when nothing (most
    models)."""
    config = getattr(model, "config", None)
    scale = getattr(model, "logit_scale", None)  # Cohere: logits * logit_scale
    divisor = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap * tanh(logits / cap)
    if not isinstance(scale, (int, float)) and not isinstance(divisor, (int, float)) and cap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, (int, float)):
            logits = logits * scale
        if isinstance(divisor, (int, float)):
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def causal_lm_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP/DeepSpeed (`.module`) and peft (`.get_base_model()`) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _unsupported_reason(lm: torch.nn.Module, head: torch.nn.Module | None, probe_ids: torch.Tensor) -> str | None:
    """None when chunked logits reproduce the model's own on a few tokens; otherwise why not."""
    if head is None:
        return f"{type(lm).__name__} has no output embedding module"
    if any(hasattr(p, "ds_id") for p in head.parameters()):
        return "the head weight is partitioned by DeepSpeed ZeRO-3"
    captured: list[torch.Tensor] = []
    autocast: list[bool] = []  # whether the model's own head ran under autocast (Accelerate's mixed precision)

    def capture(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0])
        autocast.append(torch.is_autocast_enabled(args[0].device.type))

    handle = head.register_forward_pre_hook(capture)
    was_training = lm.training
    lm.eval()  # LoRA dropout on the head would make the two computations differ
    try:
        with torch.no_grad():
            want = lm(input_ids=probe_ids, use_cache=False).logits
            transform = logit_transform(lm)
            mine = head(captured[0]) if len(captured) == 1 else None
            if mine is not None and transform is not None:
                mine = transform(mine)
    finally:
        handle.remove()
        lm.train(was_training)
    if mine is None:
        return f"{type(lm).__name__}'s forward called its output embedding {len(captured)} times, not once"
    # fp32 end to end: agreement to rounding. Otherwise (16-bit weights, or the model's head under bf16/fp16
    # autocast while this one runs in fp32) the two differ by 16-bit rounding, ~1e-3 of the logits' scale.
    precise = want.dtype == torch.float32 and head.weight.dtype == torch.float32 and not any(autocast)
    want, mine = want.float(), mine.float()
    tolerance = 1e-4 if precise else 2e-2
    if mine.shape != want.shape or not torch.allclose(mine, want, rtol=tolerance, atol=tolerance):
        gap = (mine - want).abs().max().item() if mine.shape == want.shape else "shape"
        return f"{type(lm).__name__}'s logits are not head(hidden) with the known transforms (max gap {gap})"
    return None


def chunked_head_supported(model: torch.nn.Module, probe_ids: torch.Tensor) -> bool:
    """Probe once per model whether the chunked head reproduces its logits (saying why once when not)."""
    lm = causal_lm_of(model)
    if lm not in _VERDICTS:
        reason = _unsupported_reason(lm, lm.get_output_embeddings(), probe_ids[:1, :PROBE_TOKENS])
        if reason is not None:
            print(f"[dpo] LM head: {reason}; using the model's own logits (memory grows with scored tokens x "
                  f"vocab)", file=sys.stderr)
        _VERDICTS[lm] = reason is None
    return _VERDICTS[lm]


# Whether a model class takes a boolean [R, T] `logits_to_keep` (transformers >= ~5.2x); older releases index
# hidden[:, logits_to_keep, :] and accept only an int or 1D positions.
_BOOLEAN_KEEP: dict[type, bool] = {}


def forward_keeping(model: torch.nn.Module, inputs: dict[str, Any], keep: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """`model(**inputs)` computing the head only at the `keep` positions [R, T]. Returns (output, selector): the
    output's logits are [N, V] when the model took the boolean mask; [R, T, V] when it ignored it, or [R, n, V] at
    the union of kept columns when it takes positions only; `selector` picks the kept positions out of a 3D one."""
    lm_type = type(causal_lm_of(model))
    if _BOOLEAN_KEEP.get(lm_type, True):
        try:
            out = model(**inputs, logits_to_keep=keep)
        except IndexError:  # "too many indices": this transformers indexes hidden[:, logits_to_keep, :]
            if _BOOLEAN_KEEP.get(lm_type):
                raise
            _BOOLEAN_KEEP[lm_type] = False
        else:
            _BOOLEAN_KEEP[lm_type] = True
            return out, keep
    columns = keep.any(0).nonzero().squeeze(1)
    return model(**inputs, logits_to_keep=columns), keep[:, columns]


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {"device_type": device_type, "enabled": torch.is_autocast_enabled(device_type),
            "dtype": torch.get_autocast_dtype(device_type)}


def chunked_head_logps(model: torch.nn.Module, inputs: dict[str, Any], keep: torch.Tensor, labels: torch.Tensor,
                       *, chunk_size: int) -> torch.Tensor | None:
    """log p(labels) [N] fp32 at the `keep` positions [R, T] of one forward of `model(**inputs)`, chunk by chunk;
    None when the model's head cannot be reproduced (the caller then uses the model's own logits)."""
    if not chunked_head_supported(model, inputs["input_ids"]):
        return None
    lm = causal_lm_of(model)
    head, transform = lm.get_output_embeddings(), logit_transform(lm)
    seen: dict[str, Any] = {}

    def take_hidden(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        seen["hidden"] = args[0]
        seen["autocast"] = _autocast_state(args[0].device.type)  # the precision the model's forward runs in
        return (args[0][..., :0, :],) + tuple(args[1:])  # the head computes [0, V]: nothing

    handle = head.register_forward_pre_hook(take_hidden)
    try:
        _, selector = forward_keeping(model, inputs, keep)
    finally:
        handle.remove()
    hidden = seen["hidden"]
    if hidden.dim() == 3:  # the model passed every position, or the union of the kept columns
        hidden = hidden[selector]

    def chunk_logps(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(**seen["autocast"]):
            logits = head(h) if transform is None else transform(head(h))
        return _LabelLogp.apply(logits, y)

    if _plain_linear_head(head, hidden, seen["autocast"]):
        return _LinearHeadLogps.apply(hidden, head.weight, head.bias, labels, chunk_size, transform)

    out = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, y = hidden[start:start + chunk_size], labels[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            out.append(checkpoint(chunk_logps, h, y, use_reentrant=False))
        else:
            out.append(chunk_logps(h, y))
    return torch.cat(out) if out else hidden.new_zeros((0,), dtype=torch.float32)
