"""The batch layout of a run: the fastest layout that is exact for the loaded model, checked on the model itself.

Four batched layouts give the same per-sequence log-probs wherever they are exact, fastest first, and a fifth is
exact by construction:

    packed+shared  each pair one [prompt | chosen | rejected] sequence, several pairs per row  (dpo.prefix_sharing)
    shared         one prefix-shared pair per row
    packed         chosen and rejected as separate sequences, several per row                 (dpo.data)
    padded         one right-padded sequence per row; the model builds its own masks           (dpo.data)
    single         one sequence per forward, no padding: the reference itself, and the last resort

The packed layouts hand the model an explicit mask (`dpo.masks`) and position ids, and are exact only where the
model's layers honour both; padded is exact only where padding never reaches real tokens (not so for models that
attend both ways, or pick keys by top-k over blocks that padding fills). A table of model types cannot keep up, so
`choose_layout` probes the real model once, before training (`LayoutProbe`): one pair as long as the data's longest
prompt + answer (whatever the config reader found: a window under a field it does not read still bites within the
data's lengths) and short pairs in rows that hold several sequences, one no-grad forward per layout, per-sequence
log-probs compared with each sequence run alone. A model that picks keys by a top-k among the row's positions
gets one sequence per forward whatever the probe's pairs show (`dpo.selection`: no finite probe clears it). For a
model that trains, train mode is checked too: several train-mode forwards of one batch must agree and equal eval
mode (`dpo.models.disable_dropout` switches off the randomness it can), or the model is refused unless the user
allows it, and each candidate also runs in train mode against the eval-mode single sequences. The fastest
candidate within tolerance is used; the default falls back and says why (down to one sequence per forward), an
explicit request that cannot be honoured is refused (`LayoutError`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from dpo import sequence_parallel as sp
from dpo.attention import implementation_of
from dpo.attention import mask_form as attention_mask_form
from dpo.config import TrainConfig
from dpo.data import PreferenceBatch, collate_packed, collate_padded
from dpo.errors import UserError
from dpo.logprobs import SequenceLogps, sequence_logps
from dpo.masks import AttentionSpec, attention_spec
from dpo.prefix_sharing import collate_prefix_shared
from dpo.ranked_batch import longest_ranked_sequence
from dpo.selection import SelectionWatch

# Per-sequence tolerance of a probe, |layout - padded| <= abs + rel * |padded| nats. In fp32 the layouts agree to
# ~1e-6 (summation order only). In 16-bit arithmetic two exact layouts differ by rounding (~0.01-0.05 nats per
# sequence, growing with the answer length); leaks seen on random and real models are 0.2-10 nats.
FP32_TOLERANCE = (1e-4, 1e-5)
HALF_TOLERANCE_PER_SQRT_TOKEN = 0.02
HALF_TOLERANCE_REL = 2e-3
LONG_PAIR = (8, 5)  # prompt and chosen tokens of the probe's long pair; its rejected answer makes up the length
SHORT_PAIRS = ((16, 8, 7), (10, 12, 10), (3, 13, 5), (1, 2, 5))  # (prompt, chosen, rejected) of the short pairs
TRAIN_REPEATS = 6  # train-mode forwards of the probe's short pairs compared for randomness
MIN_PROBE_LENGTH = 31  # tokens of the probe's longest sequence at least (longer than every short pair)


class LayoutError(UserError):
    """An explicitly requested layout that is not exact for the model: the message names the layout, the model
    class and the measured difference."""


@dataclass(frozen=True)
class Layout:
    packed: bool
    shared: bool
    alone: bool = False  # one forward per sequence (batch of one, no padding): the single-sequence reference

    @property
    def name(self) -> str:
        if self.alone:
            return "one sequence per forward"
        return {(True, True): "packed with prefix sharing", (False, True): "prefix sharing without packing",
                (True, False): "packed without prefix sharing", (False, False): "padded"}[(self.packed, self.shared)]

    @classmethod
    def of(cls, layout: str, prefix_sharing: bool) -> "Layout":
        if layout == "single" and not prefix_sharing:
            return SINGLE
        if layout not in ("padded", "packed"):
            raise ValueError(f"layout: unknown {layout!r}; expected padded, packed or single (without sharing)")
        return cls(packed=layout == "packed", shared=prefix_sharing)


PACKED_SHARED, SHARED, PACKED, PADDED = (Layout(True, True), Layout(False, True), Layout(True, False),
                                         Layout(False, False))
SINGLE = Layout(False, False, alone=True)
FASTEST_FIRST = (PACKED_SHARED, SHARED, PACKED, PADDED)  # the batched layouts
ALL_LAYOUTS = FASTEST_FIRST + (SINGLE,)


def make_collate(layout: Layout | str, *, pad_token_id: int, max_tokens_per_row: int, prefix_sharing: bool = False,
                 attention: AttentionSpec | None = None, mask_form: str = "dense"
                 ) -> Callable[[list[dict[str, Any]], list[float] | None], PreferenceBatch]:
    """The collate function of a layout, as `collate(pairs, weights)`; masks follow `attention` (the model's
    windows, chunks and layer types; plain causal attention when None), in the form the attention kernel takes
    (`dpo.attention.mask_form`)."""
    if isinstance(layout, str):
        layout = Layout.of(layout, prefix_sharing)
    if layout.alone:
        return lambda pairs, weights=None: replace(
            collate_padded(pairs, pad_token_id=pad_token_id, weights=weights), alone=True)
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

    layout auto + prefix_sharing auto: all four batched layouts, then one sequence per forward (the last resort,
    exact by construction). An explicit `layout` or `prefix_sharing` narrows the list: packed allows packed with or
    without sharing (unless prefix_sharing says which); padded means the plain padded layout unless prefix_sharing
    is true (one shared pair per row); single is one sequence per forward."""
    if layout == "auto":
        allowed = [c for c in ALL_LAYOUTS if prefix_sharing is None or c.shared == prefix_sharing]
    elif layout == "single":
        allowed = [SINGLE]
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
        if "responses_ids" in split.column_names:  # k answers per prompt: every answer counts (dpo.ranked_batch)
            longest = max(longest, longest_ranked_sequence(split))
    return DataShape(longest=longest, empty_prompts=empty)


def probe_length(spec: AttentionSpec, *, max_positions: int | None, longest: int | None) -> int:
    """Tokens of the probe's longest sequence: the data's longest prompt + answer, whatever the config says (a
    window the config reader misses still bites within the data's lengths, and so within the probe's). Without
    data (None) the config's windows and chunks set it: each is outrun by a few tokens."""
    if longest:
        length = max(longest, MIN_PROBE_LENGTH)
    else:
        length = max([MIN_PROBE_LENGTH] + [r + 8 for _, rule in spec.rules for r in (rule.window, rule.chunk)
                                           if r is not None])
    if max_positions:
        length = min(length, max_positions - 1)
    return max(length, sum(LONG_PAIR) + 1)


def probe_pairs(vocab_size: int, length: int, *, max_positions: int | None = None, avoid: Sequence[int] = (),
                seed: int = 0) -> list[dict[str, list[int]]]:
    """Deterministic random pairs: one long pair whose rejected sequence has `length` tokens (a short prompt and
    chosen answer, a long rejected answer: in a shared row the long branch comes after the other, and its single-
    sequence reference costs one long forward, not two), then short pairs that share rows with each other, whose
    sequences (24, 23, 22, 20, 16, 8, 6 and 3 tokens, a 1-token prompt) are padded by 0, 1, 2, 4, 8, 16 ... tokens
    in one padded batch; ids drawn from the embedding rows, skipping special ids such as padding."""
    generator = torch.Generator().manual_seed(seed)
    avoided = set(avoid)
    allowed = torch.tensor([i for i in range(min(vocab_size, 50_000)) if i not in avoided])
    cap = max_positions - 1 if max_positions else None

    def ids(n: int) -> list[int]:
        return allowed[torch.randint(len(allowed), (n,), generator=generator)].tolist()

    long_pair = (*LONG_PAIR, length - LONG_PAIR[0])
    pairs = []
    for prompt, chosen, rejected in (long_pair, *SHORT_PAIRS):
        if cap is not None:  # a model with few positions: shorten the answers, keep at least one token
            chosen, rejected = (max(1, min(n, cap - prompt)) for n in (chosen, rejected))
        pairs.append({"prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected)})
    return pairs


@dataclass
class ProbeResult:
    layout: Layout
    model_class: str
    max_difference: float  # nats from the single-sequence forwards, over every sequence (inf: the forward failed)
    tolerance: float  # the largest per-sequence tolerance
    exact: bool  # every sequence within its tolerance, in eval mode and (for a model that trains) in train mode
    error: str | None = None
    train_difference: float | None = None  # the same in train mode (None: not checked)
    row_selection: str | None = None  # where the model picks keys by top-k among the row's positions (dpo.selection)

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.model_class} fails on it ({self.error})"
        if self.row_selection is not None:
            return (f"{self.model_class} picks keys by top-k among the positions of the row ({self.row_selection}): "
                    f"padding and packing change the candidates and how ties fall, which no finite probe rules out "
                    f"(on the probe's pairs {self.max_difference:.3g} nats away from single sequences')")
        if self.train_difference is not None and self.max_difference <= self.tolerance:
            return (f"{self.model_class} in train mode gives log-probs {self.train_difference:.3g} nats away from "
                    f"single sequences' (tolerance {self.tolerance:.2g})")
        return (f"{self.model_class} gives log-probs {self.max_difference:.3g} nats away from single sequences' "
                f"(tolerance {self.tolerance:.2g})")


@dataclass(frozen=True)
class TrainCheck:
    """Train mode (dropout and the other randomness of `dpo.models.disable_dropout` off) against itself and eval."""

    random: float  # nats between train-mode forwards of the same sequences (the largest of TRAIN_REPEATS - 1 gaps)
    off_eval: float  # nats between the train-mode and the eval-mode forward
    tolerance: float

    @property
    def deterministic(self) -> bool:
        return self.random <= self.tolerance and self.off_eval <= self.tolerance

    def describe(self, model_class: str) -> str:
        if self.random > self.tolerance:
            return (f"{model_class} is random in train mode with dropout off: forwards of the same sequences "
                    f"differ by up to {self.random:.3g} nats")
        return (f"{model_class} computes otherwise in train mode: its forward is {self.off_eval:.3g} nats away from "
                f"the eval-mode one")


def model_class_name(model: torch.nn.Module) -> str:
    """The transformers class under any wrapper (DeepSpeed engine, DDP, peft)."""
    inner = _unwrap(model)
    return type(inner.get_base_model() if hasattr(inner, "get_base_model") else inner).__name__


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _tolerances(reference: torch.Tensor, lengths: torch.Tensor, *, precise: bool, noise: float) -> torch.Tensor:
    if precise:
        return FP32_TOLERANCE[0] + FP32_TOLERANCE[1] * reference.abs()
    floor = HALF_TOLERANCE_PER_SQRT_TOKEN * lengths.sqrt() + HALF_TOLERANCE_REL * reference.abs()
    return torch.maximum(floor, torch.full_like(floor, 4 * noise))


@contextmanager
def _mode(model: torch.nn.Module, *, training: bool) -> Iterator[None]:
    """The model in train or eval mode for a forward, restored afterwards. LoRA's own dropout (a choice of the user,
    and harmless at the start: a fresh adapter's B matrix is zero) stays off while the probe looks."""
    was_training = model.training
    model.train(training)
    for name, module in model.named_modules():
        if "lora_dropout" in name:
            module.eval()
    try:
        yield
    finally:
        model.train(was_training)


Run = Callable[[list[dict[str, list[int]]]], SequenceLogps]  # a candidate's forward: pairs -> per-sequence log-probs


class LayoutProbe:
    """The probe of one model: synthetic pairs as long as the data's longest, their single-sequence forwards (each
    sequence alone: batch of one, no padding, no mask) as the reference, and `compare`, which measures a
    candidate's forward against them in eval mode and, for a model that trains, in train mode.

    Pairs run in two batches, the long pair apart (padding the short ones to its length would multiply the cost).
    Train mode is checked on the short pairs: randomness and train-only code paths do not depend on the length,
    and the windows the long pair is there for are checked in eval mode. `precise`: the forward runs in fp32
    (tolerance 1e-4 nats + 1e-5 relative); otherwise 16-bit tolerances, with the noise floor measured as the
    difference between two padded arrangements of the same pairs. `reduce_max` takes the maximum over processes,
    so every process decides alike (ZeRO-3 runs every forward on every rank)."""

    GROUPS = ([0], [1, 2, 3, 4])
    SHORT = [1, 2, 3, 4]

    def __init__(self, model: torch.nn.Module, spec: AttentionSpec, *, pad_token_id: int, max_tokens_per_row: int,
                 precise: bool, longest: int | None = None, reduce_max: Callable[[float], float] = lambda x: x,
                 device: torch.device | str | None = None, train: bool = False, mask_form: str | None = None
                 ) -> None:
        self.model, self.spec, self.pad_token_id = model, spec, pad_token_id
        # The masks in the form of the model's own kernel: a (layout, attention implementation) pair is checked.
        self.mask_form = mask_form or attention_mask_form(implementation_of(model))
        self.max_tokens_per_row, self.reduce_max = max_tokens_per_row, reduce_max
        self.model_class = model_class_name(model)
        self.device = device if device is not None else next(model.parameters()).device
        text = _text_config(_config_of(model))
        length = probe_length(spec, max_positions=getattr(text, "max_position_embeddings", None), longest=longest)
        max_positions = getattr(text, "max_position_embeddings", None)
        self.pairs = probe_pairs(int(getattr(text, "vocab_size", None) or 32), length, max_positions=max_positions,
                                 avoid=[pad_token_id])
        single = self.run_of(SINGLE)
        watch = SelectionWatch()  # top-k calls of the single forwards: a selection among the row's positions
        noise = 0.0
        with _mode(model, training=False):
            with watch:
                self.reference, self.lengths = self._gather(single, self.GROUPS)
            if not precise:  # the same pairs in other batches and orders: the rounding noise of this model
                padded = self.run_of(PADDED)
                first, _ = self._gather(padded, [self.SHORT])
                second, _ = self._gather(padded, [[4, 1], [3, 2]])
                noise = reduce_max(float((first - second)[self._short].abs().max()))
        sites = watch.row_dependent()  # every process decides alike
        self.row_selections = sites or (["on another process"] if reduce_max(float(bool(sites))) > 0 else [])
        self.tolerance = _tolerances(self.reference, self.lengths, precise=precise, noise=noise)
        self.train_check: TrainCheck | None = None
        if train:
            self.train_check = self._check_train_mode()

    def _check_train_mode(self) -> TrainCheck:
        """TRAIN_REPEATS train-mode forwards of one padded batch against each other and against the eval-mode
        forward of the same batch: randomness that moves only some tokens (a router sampling experts flips a
        choice now and then) shows in one of several forwards sooner than in two. The same layout on both sides,
        so the check says nothing of padding; whether a layout is exact in train mode is `compare`'s question,
        against the eval-mode single sequences (what a run's log-probs must equal)."""
        padded, batch = self.run_of(PADDED), [self.SHORT[:2]]
        with _mode(self.model, training=False):
            eval_values, _ = self._gather(padded, batch)
        with _mode(self.model, training=True):
            repeats = [self._gather(padded, batch)[0] for _ in range(TRAIN_REPEATS)]
        two = torch.tensor(self.SHORT[:2] + [len(self.pairs) + i for i in self.SHORT[:2]])
        random = max(float((r - repeats[0])[two].abs().max()) for r in repeats[1:])
        off_eval = float((repeats[0] - eval_values)[two].abs().max())
        return TrainCheck(random=self.reduce_max(random), off_eval=self.reduce_max(off_eval),
                          tolerance=float(self.tolerance[two].max()))

    @property
    def _short(self) -> torch.Tensor:
        n = len(self.pairs)
        return torch.tensor(self.SHORT + [n + i for i in self.SHORT])

    def run_of(self, layout: Layout) -> Run:
        """The project's forward of a layout (the function a run calls per batch)."""
        collate = make_collate(layout, pad_token_id=self.pad_token_id, max_tokens_per_row=self.max_tokens_per_row,
                               attention=self.spec, mask_form=self.mask_form)
        return lambda pairs: sequence_logps(self.model, collate(pairs, None).to(self.device))

    def _gather(self, run: Run, groups: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """[2B] float64 log-probs (chosen answers, then rejected; NaN for pairs in no group) and answer lengths."""
        n = len(self.pairs)
        values, lengths = torch.full((2 * n,), math.nan, dtype=torch.float64), torch.zeros(2 * n, dtype=torch.float64)
        for group in groups:
            out = run([self.pairs[i] for i in group])
            for k, i in enumerate(group):
                values[i], values[n + i] = float(out.chosen_logps[k].detach()), float(out.rejected_logps[k].detach())
                lengths[i], lengths[n + i] = float(out.chosen_lengths[k]), float(out.rejected_lengths[k])
        return values, lengths

    def compare(self, layout: Layout, run: Run) -> ProbeResult:
        """`run`'s per-sequence log-probs against the single-sequence forwards, in eval mode, then (for a model that
        trains and is deterministic in train mode) in train mode on the short pairs."""
        error, difference, excess, train_difference = None, math.inf, math.inf, None
        try:
            with _mode(self.model, training=False):
                values, _ = self._gather(run, self.GROUPS)
            difference, excess = self._distance(values, self.reference, slice(None))
            check = self.train_check
            if check is not None and check.deterministic and excess <= 0:
                with _mode(self.model, training=True):
                    values, _ = self._gather(run, [self.SHORT])
                train_difference, train_excess = self._distance(values, self.reference, self._short)
                excess = max(excess, train_excess)
        except Exception as exc:  # a model that cannot take the layout's inputs at all
            first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
            error = f"{type(exc).__name__}: {first_line}" if first_line else type(exc).__name__
        return ProbeResult(layout=layout, model_class=self.model_class, max_difference=self.reduce_max(difference),
                           tolerance=float(self.tolerance.max()), exact=error is None and self.reduce_max(excess) <= 0,
                           error=error, train_difference=train_difference)

    def _distance(self, values: torch.Tensor, reference: torch.Tensor, index: torch.Tensor | slice
                  ) -> tuple[float, float]:
        gap = (values - reference)[index].abs()
        if not bool(torch.isfinite(gap).all()):
            return math.inf, math.inf
        return float(gap.max()), float((gap - self.tolerance[index]).max())

    def check(self, layout: Layout) -> ProbeResult:
        if layout == SINGLE:  # the reference itself
            return ProbeResult(layout=SINGLE, model_class=self.model_class, max_difference=0.0,
                               tolerance=float(self.tolerance.max()), exact=True)
        result = self.compare(layout, self.run_of(layout))
        if self.row_selections and result.error is None:  # measured all the same, for the message
            result.exact, result.row_selection = False, ", ".join(self.row_selections)
        return result


@torch.no_grad()
def probe_layouts(model: torch.nn.Module, spec: AttentionSpec, candidates: Sequence[Layout], *, pad_token_id: int,
                  max_tokens_per_row: int, precise: bool, longest: int | None = None,
                  reduce_max: Callable[[float], float] = lambda x: x, stop_at_first: bool = True,
                  device: torch.device | str | None = None, train: bool = False, mask_form: str | None = None
                  ) -> list[ProbeResult]:
    """Each candidate's per-sequence log-probs against single sequences (`LayoutProbe`), in order; with
    `stop_at_first` the probe ends at the first exact one. `train`: check train mode too. Batches go to `device`
    (default: where the model's first parameter is); masks take the form of the model's attention kernel unless
    `mask_form` says otherwise."""
    probe = LayoutProbe(model, spec, pad_token_id=pad_token_id, max_tokens_per_row=max_tokens_per_row,
                        precise=precise, longest=longest, reduce_max=reduce_max, device=device, train=train,
                        mask_form=mask_form)
    results = []
    for layout in candidates:
        results.append(probe.check(layout))
        if stop_at_first and results[-1].exact:
            break
    return results


def same_forward(model: torch.nn.Module, other: torch.nn.Module) -> bool:
    """Whether two models compute the same eval-mode function: same class, config, attention implementation, and
    equal parameters and buffers (names, dtypes, devices, values). A ZeRO-3 partition holds a placeholder, not the
    values: never the same then (each is probed)."""
    first, second = _unwrap(model), _unwrap(other)
    if first is second:
        return True
    if type(first) is not type(second) or implementation_of(first) != implementation_of(second):
        return False
    if first.config.to_dict() != second.config.to_dict():
        return False
    mine, theirs = ({**dict(m.named_parameters()), **dict(m.named_buffers())} for m in (first, second))
    if mine.keys() != theirs.keys() or any(hasattr(t, "ds_numel") for t in (*mine.values(), *theirs.values())):
        return False
    return all(p.dtype == theirs[n].dtype and p.device == theirs[n].device and torch.equal(p, theirs[n])
               for n, p in mine.items())


def _config_of(model: torch.nn.Module) -> Any:
    return _unwrap(model).config


def _text_config(config: Any) -> Any:
    try:
        return config.get_text_config() if hasattr(config, "get_text_config") else config
    except ValueError:  # several decoders: the config itself
        return config


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
                  device: torch.device | str | None = None, allow_nondeterministic_train: bool = False
                  ) -> LayoutChoice:
    """The fastest allowed layout that is exact on every model that will see the batches (the policy, and a
    frozen reference of another architecture), against each sequence run alone. A model in train mode (the
    policy) must also be deterministic in train mode and equal its eval-mode forward, or is refused unless
    `allow_nondeterministic_train`. Raises LayoutError when an explicit request cannot be honoured or a model is
    refused.

    All models must read the same masks: when their attention specs differ, only the padded layout (where each
    model builds its own) and one sequence per forward are used."""
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
        rejected += [(c, reason) for c in remaining if c not in (PADDED, SINGLE)]
        remaining = [c for c in remaining if c in (PADDED, SINGLE)]
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
    with torch.no_grad():
        # A frozen reference that is the policy's twin (same code, weights, dtype, device) computes the policy's
        # eval-mode forward, which the policy's probe checks anyway: probing it again would double the cost.
        probed = []
        for i, model in enumerate(models):
            novel = not any(same_forward(model, earlier) for earlier in models[:i])
            if reduce_max(float(novel)) > 0:  # every process decides alike
                probed.append(model)
        probes = [LayoutProbe(model, spec, pad_token_id=pad_token_id, max_tokens_per_row=max_tokens_per_row,
                              precise=precise, longest=longest, reduce_max=reduce_max, device=device,
                              train=model.training) for model in probed]
        notes = _train_notes(probes, allow=allow_nondeterministic_train)
        for candidate in remaining:
            failures = [r.describe() for r in (p.check(candidate) for p in probes) if not r.exact]
            if not failures:
                chosen = candidate
                break
            rejected.append((candidate, "; ".join(failures)))
    if chosen is None:
        what = "; ".join(f"{c.name}: {why}" for c, why in rejected)
        raise LayoutError(f"layout {candidates[0].name} is not exact for this model: {what}. Use --layout auto "
                          f"(the fastest exact layout) or --layout single (one sequence per forward)")
    message = (_message(chosen, rejected, spec, explicit, implementation) + "".join(f" [{note}]" for note in notes)
               + f" [probe {time.perf_counter() - started:.2f} s]")
    return LayoutChoice(layout=chosen, attention=spec, message=message,
                        mask_form=attention_mask_form(implementation))


def _train_notes(probes: Sequence[LayoutProbe], *, allow: bool) -> list[str]:
    """Refuses a model that is not deterministic in train mode (one line naming it), or, when allowed, says so."""
    notes = []
    for probe in probes:
        check = probe.train_check
        if check is None or check.deterministic:
            continue
        what = check.describe(probe.model_class)
        if not allow:
            raise LayoutError(f"{what}; its log-probs would be noise around the reference's. Set "
                              f"allow_nondeterministic_train: true (--allow_nondeterministic_train true) to train "
                              f"it anyway")
        notes.append(f"{what}: allowed by allow_nondeterministic_train; layouts checked in eval mode only")
    return notes


def _message(chosen: Layout, rejected: list[tuple[Layout, str]], spec: AttentionSpec, explicit: bool,
             implementation: str = "sdpa") -> str:
    line = f"[dpo] layout: {chosen.name} on {implementation}"
    faster = [(c, why) for c, why in rejected if ALL_LAYOUTS.index(c) < ALL_LAYOUTS.index(chosen)]
    if faster:
        line += ": " + "; ".join(f"not {c.name}: {why}" for c, why in faster)
    elif chosen not in (PADDED, SINGLE):
        line += f" (checked on the model against single sequences; attention: {spec.describe()})"
    if spec.unknown_types and (faster or chosen in (PADDED, SINGLE)):
        line += f" (unknown layer types, probed: {', '.join(spec.unknown_types)})"
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
                         empty_prompts=data.empty_prompts, reduce_max=reduce_max, device=accelerator.device,
                         allow_nondeterministic_train=cfg.allow_nondeterministic_train)


# ------------------------------------------------------------------------------------------------ split rows

SPLIT_PROBE_LENGTH = 48  # tokens of the split check's long sequence: several attention blocks on every rank


@torch.no_grad()
def check_split_rows(models: Sequence[torch.nn.Module], choice: LayoutChoice, cfg: TrainConfig, accelerator: Any, *,
                     group: Any, pad_token_id: int) -> str:
    """Sequence parallelism checked on the models themselves, as the layout is: probe pairs in the run's layout, each
    model's per-sequence log-probs with the rows whole, then (after `dpo.sequence_parallel.install`) with the rows
    split across `group`; a model that is not within the layout probe's tolerance - a layer that mixes tokens outside
    attention, per-head state the split does not cut, an attention path the wrapper does not reach - is refused
    with one line (the split attention is removed first). Returns the log line."""
    text = _text_config(_config_of(models[0]))
    pairs = probe_pairs(int(getattr(text, "vocab_size", None) or 32), SPLIT_PROBE_LENGTH,
                        max_positions=getattr(text, "max_position_embeddings", None), avoid=[pad_token_id])
    batch = make_collate(choice.layout, pad_token_id=pad_token_id, max_tokens_per_row=cfg.max_tokens_per_row,
                         attention=choice.attention, mask_form=choice.mask_form)(pairs, None)
    precise = all(next(m.parameters()).dtype == torch.float32 for m in models) and cfg.mixed_precision == "no"

    def values(model: torch.nn.Module, rows: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with _mode(model, training=False):
            out = sequence_logps(model, rows.to(accelerator.device))
        lengths = torch.cat([out.chosen_lengths, out.rejected_lengths]).double().cpu()
        return torch.cat([out.chosen_logps, out.rejected_logps]).double().cpu(), lengths

    whole = [values(m, batch) for m in models]
    restore = sp.install(group, cfg.attn_implementation)
    worst, failed = 0.0, None
    for model, (want, lengths) in zip(models, whole):
        try:
            got, _ = values(model, sp.shard(batch, group, choice.attention, mask_form=choice.mask_form))
            difference = (got - want).abs()
            gap = float(difference.max()) if bool(torch.isfinite(difference).all()) else math.inf
            excess = float((difference - _tolerances(want, lengths, precise=precise, noise=0.0)).max())
            excess = excess if math.isfinite(excess) else math.inf
        except Exception as exc:  # a model whose attention the split cannot run at all
            gap, excess, failed = math.inf, math.inf, f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        worst = max(worst, gap)
        if _reduce_max(excess, accelerator) > 0:
            restore()
            what = failed or f"log-probs {_reduce_max(gap, accelerator):.3g} nats away from the whole rows'"
            raise UserError(f"sequence_parallel_size {group.size}: {model_class_name(model)} split across "
                            f"{group.size} processes gives {what} (checked on the model; some layer mixes tokens "
                            f"outside attention or keeps per-head state); train it with --sequence_parallel_size 1")
    return (f"[dpo] sequence parallel: each row split across {group.size} processes ({cfg.attn_implementation}, "
            f"{group.data_size} data-parallel groups; checked on the model against whole rows: "
            f"{_reduce_max(worst, accelerator):.2g} nats)")


def _reduce_max(value: float, accelerator: Any) -> float:
    if accelerator.num_processes == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())
