"""The batch layout of a run: the fastest layout that is exact for the loaded model, checked on the model itself.

Four layouts give the same per-sequence log-probs wherever they are exact, fastest first:

    packed+shared  each pair one [prompt | chosen | rejected] sequence, several pairs per row  (dpo.prefix_sharing)
    shared         one prefix-shared pair per row
    packed         chosen and rejected as separate sequences, several per row                 (dpo.data)
    padded         one right-padded sequence per row; the model builds its own masks           (dpo.data)

The padded layout is exact on every causal LM (real tokens never see the padding after them) and is the baseline.
The others hand the model an explicit mask (`dpo.masks`) and position ids, and are exact only where the model's
layers honour both. They do not on: ALiBi models under prefix sharing (biases follow the order of tokens in the
row), hybrids with short convolutions, linear attention or SSM layers (they ignore masks), BLOOM and Falcon with
ALiBi (they cannot take a 4D mask), and whatever custom code does next. A table of model types cannot keep up, so
`choose_layout` probes the real model once, before training: a few synthetic pairs whose sequences outrun every
window and chunk that can matter for the data, in rows that hold several sequences, one no-grad forward per layout,
per-sequence log-probs compared with the padded layout's. The fastest candidate within tolerance is used; the
default falls back and says why, an explicit request that cannot be honoured is refused (`LayoutError`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from dpo.attention import implementation_of
from dpo.attention import mask_form as attention_mask_form
from dpo.config import TrainConfig
from dpo.data import PreferenceBatch, collate_packed, collate_padded
from dpo.errors import UserError
from dpo.logprobs import SequenceLogps, sequence_logps
from dpo.masks import AttentionSpec, attention_spec
from dpo.prefix_sharing import collate_prefix_shared

# Per-sequence tolerance of a probe, |layout - padded| <= abs + rel * |padded| nats. In fp32 the layouts agree to
# ~1e-6 (summation order only). In 16-bit arithmetic two exact layouts differ by rounding (~0.01-0.05 nats per
# sequence, growing with the answer length); leaks seen on random and real models are 0.2-10 nats.
FP32_TOLERANCE = (1e-4, 1e-5)
HALF_TOLERANCE_PER_SQRT_TOKEN = 0.02
HALF_TOLERANCE_REL = 2e-3
PROBE_ANSWERS = ((5, 7), (9, 3), (4, 6), (2, 5))  # (chosen, rejected) tokens of the probe's pairs
MIN_PROBE_PROMPT = 24


class LayoutError(UserError):
    """An explicitly requested layout that is not exact for the model: the message names the layout, the model
    class and the measured difference."""


@dataclass(frozen=True)
class Layout:
    packed: bool
    shared: bool

    @property
    def name(self) -> str:
        return {(True, True): "packed with prefix sharing", (False, True): "prefix sharing without packing",
                (True, False): "packed without prefix sharing", (False, False): "padded"}[(self.packed, self.shared)]

    @classmethod
    def of(cls, layout: str, prefix_sharing: bool) -> "Layout":
        if layout not in ("padded", "packed"):
            raise ValueError(f"layout: unknown {layout!r}; expected padded or packed")
        return cls(packed=layout == "packed", shared=prefix_sharing)


PACKED_SHARED, SHARED, PACKED, PADDED = (Layout(True, True), Layout(False, True), Layout(True, False),
                                         Layout(False, False))
FASTEST_FIRST = (PACKED_SHARED, SHARED, PACKED, PADDED)


def make_collate(layout: Layout | str, *, pad_token_id: int, max_tokens_per_row: int, prefix_sharing: bool = False,
                 attention: AttentionSpec | None = None, mask_form: str = "dense"
                 ) -> Callable[[list[dict[str, Any]], list[float] | None], PreferenceBatch]:
    """The collate function of a layout, as `collate(pairs, weights)`; masks follow `attention` (the model's
    windows, chunks and layer types; plain causal attention when None), in the form the attention kernel takes
    (`dpo.attention.mask_form`)."""
    if isinstance(layout, str):
        layout = Layout.of(layout, prefix_sharing)
    if layout.shared:
        return lambda pairs, weights=None: collate_prefix_shared(
            pairs, pad_token_id=pad_token_id, max_tokens_per_row=max_tokens_per_row, weights=weights,
            packed=layout.packed, attention=attention, mask_form=mask_form)
    if layout.packed:
        return lambda pairs, weights=None: collate_packed(
            pairs, pad_token_id=pad_token_id, max_tokens_per_row=max_tokens_per_row, weights=weights,
            attention=attention, mask_form=mask_form)
    return lambda pairs, weights=None: collate_padded(pairs, pad_token_id=pad_token_id, weights=weights)


def candidate_layouts(layout: str, prefix_sharing: bool | None) -> tuple[list[Layout], bool]:
    """The layouts a config allows, fastest first, and whether the choice was explicit.

    layout auto + prefix_sharing auto: all four. An explicit `layout` or `prefix_sharing` narrows the list:
    packed allows packed with or without sharing (unless prefix_sharing says which); padded means the plain padded
    layout unless prefix_sharing is true (one shared pair per row)."""
    if layout == "auto":
        allowed = [c for c in FASTEST_FIRST if prefix_sharing is None or c.shared == prefix_sharing]
    elif layout == "packed":
        allowed = [c for c in (PACKED_SHARED, PACKED) if prefix_sharing is None or c.shared == prefix_sharing]
    else:
        allowed = [SHARED if prefix_sharing else PADDED]
    return allowed, not (layout == "auto" and prefix_sharing is None)


# ------------------------------------------------------------------------------------------------ the probe


@dataclass(frozen=True)
class DataShape:
    """What the layout choice needs to know of the data."""

    longest: int  # tokens of the longest prompt + answer (what windows and chunks can ever see of it)
    empty_prompts: bool  # a pair with no prompt token cannot be shared (its first answer token has no predictor)


def data_shape(*splits: datasets.Dataset | None) -> DataShape:
    longest, empty = 0, False
    for split in splits:
        if split is None or len(split) == 0:
            continue
        prompt = pc.list_value_length(split.data.column("prompt_ids"))
        empty = empty or pc.min(prompt).as_py() == 0
        for key in ("chosen_ids", "rejected_ids"):
            answer = pc.list_value_length(split.data.column(key))
            longest = max(longest, pc.max(pc.add(prompt, answer)).as_py() or 0)
    return DataShape(longest=longest, empty_prompts=empty)


def probe_prompt_length(spec: AttentionSpec, *, max_positions: int | None, longest: int | None) -> int:
    """Long enough that every window or chunk the data can outrun is outrun by the probe's first pair; windows
    longer than the data's longest sequence never bite, so they need not be probed (a 4096-token window is
    not probed with 4k-token sequences when the data holds 600-token ones)."""
    biting = [r for _, rule in spec.rules for r in (rule.window, rule.chunk)
              if r is not None and (longest is None or r < longest)]
    length = max([MIN_PROBE_PROMPT] + [r + 8 for r in biting])
    if max_positions:
        length = min(length, max_positions - 1 - max(c + r for c, r in PROBE_ANSWERS))
    return max(length, 2)


def probe_pairs(vocab_size: int, prompt_len: int, *, avoid: Sequence[int] = (), seed: int = 0
                ) -> list[dict[str, list[int]]]:
    """Deterministic random pairs: a long prompt, a middle one, short ones that share rows with others, a 1-token
    prompt; ids drawn from the embedding rows, skipping special ids such as padding."""
    generator = torch.Generator().manual_seed(seed)
    avoided = set(avoid)
    allowed = torch.tensor([i for i in range(min(vocab_size, 50_000)) if i not in avoided])

    def ids(n: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()

    prompts = (prompt_len, min(prompt_len // 2 + 1, 40), 3, 1)  # only the first need outrun a window
    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
            for p, (c, r) in zip(prompts, PROBE_ANSWERS)]


@dataclass
class ProbeResult:
    layout: Layout
    model_class: str
    max_difference: float  # nats, over every sequence of the probe (inf when the forward failed)
    tolerance: float  # the largest per-sequence tolerance
    exact: bool  # every sequence within its tolerance
    error: str | None = None

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.model_class} fails on it ({self.error})"
        return (f"{self.model_class} gives log-probs {self.max_difference:.3g} nats away from the padded layout's "
                f"(tolerance {self.tolerance:.2g})")


def model_class_name(model: torch.nn.Module) -> str:
    """The transformers class under any wrapper (DeepSpeed engine, DDP, peft)."""
    inner = _unwrap(model)
    return type(inner.get_base_model() if hasattr(inner, "get_base_model") else inner).__name__


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _tolerances(padded: torch.Tensor, lengths: torch.Tensor, *, precise: bool, noise: float) -> torch.Tensor:
    if precise:
        return FP32_TOLERANCE[0] + FP32_TOLERANCE[1] * padded.abs()
    floor = HALF_TOLERANCE_PER_SQRT_TOKEN * lengths.sqrt() + HALF_TOLERANCE_REL * padded.abs()
    return torch.maximum(floor, torch.full_like(floor, 4 * noise))


@torch.no_grad()
def probe_layouts(model: torch.nn.Module, spec: AttentionSpec, candidates: Sequence[Layout], *, pad_token_id: int,
                  max_tokens_per_row: int, precise: bool, longest: int | None = None,
                  reduce_max: Callable[[float], float] = lambda x: x, stop_at_first: bool = True,
                  device: torch.device | str | None = None, mask_form: str | None = None) -> list[ProbeResult]:
    """Per-sequence log-probs of each candidate against the padded layout on synthetic pairs, in eval mode.

    `precise`: the forward runs in fp32 (tolerance 1e-4 nats + 1e-5 relative); otherwise 16-bit tolerances, with
    the noise floor measured as the difference between two padded arrangements of the same pairs. `reduce_max`
    takes the maximum over processes, so every process decides alike (ZeRO-3 runs every forward on every rank).
    Candidates are tried in order; with `stop_at_first` the probe ends at the first exact one. Batches go to
    `device` (default: where the model's first parameter is). Masks take the form of the model's own attention
    implementation unless `mask_form` says otherwise, so a (layout, implementation) pair is what gets checked."""
    mask_form = mask_form or attention_mask_form(implementation_of(model))
    config = _config_of(model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    max_positions = getattr(text, "max_position_embeddings", None)
    prompt_len = probe_prompt_length(spec, max_positions=max_positions, longest=longest)
    pairs = probe_pairs(int(getattr(text, "vocab_size", None) or 32), prompt_len, avoid=[pad_token_id])
    device = device if device is not None else next(model.parameters()).device

    def logps(batch: PreferenceBatch) -> SequenceLogps:
        return sequence_logps(model, batch.to(device))

    def padded_logps(groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[2B] log-probs and answer lengths in the padded layout, one batch per group of pairs (the long first pair
        apart: padding the short ones to its length would multiply the probe's cost)."""
        values, lengths = torch.zeros(2 * len(pairs), dtype=torch.float64), torch.zeros(2 * len(pairs))
        for group in groups:
            out = logps(collate_padded([pairs[i] for i in group], pad_token_id=pad_token_id))
            for k, i in enumerate(group):
                values[i], values[len(pairs) + i] = out.chosen_logps[k], out.rejected_logps[k]
                lengths[i], lengths[len(pairs) + i] = out.chosen_lengths[k], out.rejected_lengths[k]
        return values, lengths.double()

    was_training = model.training
    model.eval()
    try:
        padded, lengths = padded_logps([[0], [1, 2, 3]])
        noise = 0.0
        if not precise:  # the same pairs in other batches and orders: the rounding noise of this model
            regrouped, _ = padded_logps([[0, 3], [2, 1]])
            noise = reduce_max(float((regrouped - padded).abs().max()))
        tolerance = _tolerances(padded, lengths, precise=precise, noise=noise)
        results = []
        for layout in candidates:
            collate = make_collate(layout, pad_token_id=pad_token_id, max_tokens_per_row=max_tokens_per_row,
                                   attention=spec, mask_form=mask_form)
            error = None
            try:
                out = logps(collate(pairs, None))
                gap = (torch.cat([out.chosen_logps, out.rejected_logps]).double().cpu() - padded).abs()
                finite = bool(torch.isfinite(gap).all())
                difference = float(gap.max()) if finite else math.inf
                excess = float((gap - tolerance).max()) if finite else math.inf
            except Exception as exc:  # a model that cannot take the layout's inputs at all
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                error = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
                difference, excess = math.inf, math.inf
            results.append(ProbeResult(layout=layout, model_class=model_class_name(model),
                                       max_difference=reduce_max(difference), tolerance=float(tolerance.max()),
                                       exact=error is None and reduce_max(excess) <= 0, error=error))
            if stop_at_first and results[-1].exact:
                break
        return results
    finally:
        model.train(was_training)


def _config_of(model: torch.nn.Module) -> Any:
    return _unwrap(model).config


# ------------------------------------------------------------------------------------------------ the decision


@dataclass
class LayoutChoice:
    layout: Layout
    attention: AttentionSpec
    message: str  # one line for the log
    mask_form: str = "dense"  # the masks the attention implementation takes (dpo.attention.mask_form)


def static_reason(spec: AttentionSpec, layout: Layout, implementation: str = "sdpa") -> str | None:
    """Why a layout cannot be exact for a model of `spec` under `implementation`, when that alone says so."""
    if layout.shared and attention_mask_form(implementation) == "varlen":
        return f"{implementation} takes no custom mask, and prefix sharing needs one"
    if layout != PADDED and spec.recurrent_types:
        return (f"layers of type {', '.join(spec.recurrent_types)} mix the tokens of a row in order, whatever the "
                f"mask and position ids")
    return None


def choose_layout(models: Sequence[torch.nn.Module], *, layout: str, prefix_sharing: bool | None,
                  pad_token_id: int, max_tokens_per_row: int, precise: bool, longest: int | None = None,
                  empty_prompts: bool = False, reduce_max: Callable[[float], float] = lambda x: x,
                  device: torch.device | str | None = None) -> LayoutChoice:
    """The fastest allowed layout that is exact on every model that will see the batches (the policy, and a
    frozen reference of another architecture). Raises LayoutError when an explicit request cannot be honoured.

    All models must read the same masks: when their attention specs differ, only the padded layout (where each
    model builds its own) is used."""
    started = time.perf_counter()
    candidates, explicit = candidate_layouts(layout, prefix_sharing)
    specs = [attention_spec(_config_of(m)) for m in models]
    spec = specs[0]
    implementations = {implementation_of(m) for m in models}
    implementation = implementation_of(models[0])
    rejected: list[tuple[Layout, str]] = []
    remaining = list(candidates)
    if len(set(specs)) > 1 or len(implementations) > 1:
        reason = "the reference model's attention differs from the policy's"
        rejected += [(c, reason) for c in remaining if c != PADDED]
        remaining = [c for c in remaining if c == PADDED]
    if empty_prompts:
        reason = "some pairs have an empty prompt (nothing predicts their first answer token in a shared row)"
        rejected += [(c, reason) for c in remaining if c.shared]
        remaining = [c for c in remaining if not c.shared]
    for candidate in list(remaining):
        reason = static_reason(spec, candidate, implementation)
        if reason:
            rejected.append((candidate, f"{model_class_name(models[0])}: {reason}"))
            remaining.remove(candidate)
    chosen: Layout | None = None
    for candidate in remaining:
        if candidate == PADDED:
            chosen = candidate
            break
        failures = []
        for model in models:
            result = probe_layouts(model, spec, [candidate], pad_token_id=pad_token_id,
                                   max_tokens_per_row=max_tokens_per_row, precise=precise, longest=longest,
                                   reduce_max=reduce_max, device=device)[0]
            if not result.exact:
                failures.append(result.describe())
        if not failures:
            chosen = candidate
            break
        rejected.append((candidate, "; ".join(failures)))
    if chosen is None:
        what = "; ".join(f"{c.name}: {why}" for c, why in rejected)
        raise LayoutError(f"layout {candidates[0].name} is not exact for this model: {what}. Use --layout auto "
                          f"(the fastest exact layout) or --layout padded --prefix_sharing false")
    message = _message(chosen, rejected, spec, explicit, implementation)
    message += f" [probe {time.perf_counter() - started:.2f} s]"
    return LayoutChoice(layout=chosen, attention=spec, message=message,
                        mask_form=attention_mask_form(implementation))


def _message(chosen: Layout, rejected: list[tuple[Layout, str]], spec: AttentionSpec, explicit: bool,
             implementation: str = "sdpa") -> str:
    line = f"[dpo] layout: {chosen.name} on {implementation}"
    faster = [(c, why) for c, why in rejected if FASTEST_FIRST.index(c) < FASTEST_FIRST.index(chosen)]
    if faster:
        line += ": " + "; ".join(f"not {c.name}: {why}" for c, why in faster)
    elif chosen != PADDED:
        line += f" (checked on the model against the padded layout; attention: {spec.describe()})"
    if explicit and not faster:
        line += " [as requested]"
    return line


def choose_run_layout(models: Sequence[torch.nn.Module], cfg: TrainConfig, accelerator: Any, *, pad_token_id: int,
                      data: DataShape) -> LayoutChoice:
    """`choose_layout` for a run: the config's request, the run's precision, every process deciding alike."""

    def reduce_max(value: float) -> float:
        if accelerator.num_processes == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())

    fp32_weights = all(next(m.parameters()).dtype == torch.float32 for m in models)
    return choose_layout(models, layout=cfg.layout, prefix_sharing=cfg.prefix_sharing, pad_token_id=pad_token_id,
                         max_tokens_per_row=cfg.max_tokens_per_row,
                         precise=fp32_weights and cfg.mixed_precision == "no", longest=data.longest,
                         empty_prompts=data.empty_prompts, reduce_max=reduce_max, device=accelerator.device)
