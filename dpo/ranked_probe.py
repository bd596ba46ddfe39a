"""The layout probe's check of k-answer rows: after `dpo.layouts.choose_layout` has proven a layout exact on pairs,
a run on data with K > 2 answers per prompt also checks that layout with K answers per prompt (K branches of one
prompt in a shared row), each answer against its own single-sequence forward, on every model that sees the batches.
A layout that fails falls back to the next one (down to one sequence per forward), saying why.

    choice = choose_run_layout(models, cfg, accelerator, pad_token_id=pad, data=shape)
    choice = check_ranked_layout(models, choice, cfg, accelerator, pad_token_id=pad, num_answers=K, longest=...)

The probe records are the pair probe's own (`dpo.layouts.probe_pairs`: one as long as the data's longest prompt +
answer, short ones sharing rows), each given K answers: its chosen and rejected answers and those of the next pairs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from dpo.layouts import (
    ALL_LAYOUTS,
    SINGLE,
    Layout,
    LayoutChoice,
    LayoutError,
    _config_of,
    _mode,
    _text_config,
    _tolerances,
    model_class_name,
    probe_length,
    probe_pairs,
)
from dpo.logprobs import sequence_logps
from dpo.ranked_batch import make_ranked_collate


def probe_records(pairs: list[dict[str, list[int]]], num_answers: int) -> list[dict[str, Any]]:
    """Each probe pair's prompt with `num_answers` answers: its own two, then the next pairs' answers in turn."""
    answers = [a for pair in pairs for a in (pair["chosen_ids"], pair["rejected_ids"])]
    return [{"prompt_ids": pair["prompt_ids"],
             "responses_ids": [answers[(2 * i + a) % len(answers)] for a in range(num_answers)],
             "scores": [float(num_answers - a) for a in range(num_answers)]} for i, pair in enumerate(pairs)]


def _values(model: torch.nn.Module, layout: Layout, records: list[dict[str, Any]], *, num_answers: int,
            pad_token_id: int, max_tokens_per_row: int, choice: LayoutChoice, device: Any
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float64 log-probs and token counts of the records, the long record in a batch of its own."""
    collate = make_ranked_collate(layout, num_answers=num_answers, pad_token_id=pad_token_id,
                                  max_tokens_per_row=max_tokens_per_row, attention=choice.attention,
                                  mask_form=choice.mask_form)
    values, lengths = [], []
    for group in (records[:1], records[1:]):
        batch = collate(group, None).to(device)
        out = sequence_logps(model, batch)
        values.append(batch.unflatten(out.chosen_logps, out.rejected_logps).detach().double().cpu())
        lengths.append(batch.unflatten(out.chosen_lengths, out.rejected_lengths).double().cpu())
    return torch.cat(values), torch.cat(lengths)


@torch.no_grad()
def check_ranked_layout(models: list[torch.nn.Module], choice: LayoutChoice, cfg: Any, accelerator: Any, *,
                        pad_token_id: int, num_answers: int, longest: int | None) -> LayoutChoice:
    """`choice` when its layout is exact on rows of `num_answers` answers per prompt on every model, else the
    fastest slower layout that is (SINGLE is exact by construction). An explicit layout request that fails raises
    LayoutError, as the pair probe does."""
    if num_answers <= 2 or choice.layout == SINGLE:
        return choice
    precise = all(next(m.parameters()).dtype == torch.float32 for m in models) and cfg.mixed_precision == "no"
    candidates = [c for c in ALL_LAYOUTS[ALL_LAYOUTS.index(choice.layout):]
                  if cfg.prefix_sharing is None or c.shared == cfg.prefix_sharing or c == SINGLE]
    failures: list[str] = []
    for layout in candidates:
        problems = [p for p in (_problem(m, layout, num_answers=num_answers, pad_token_id=pad_token_id,
                                         cfg=cfg, choice=choice, longest=longest, precise=precise,
                                         device=accelerator.device, num_processes=accelerator.num_processes)
                                for m in models) if p]
        if not problems:
            if layout == choice.layout:
                return choice
            message = (choice.message.replace(choice.layout.name, layout.name, 1)
                       + f" [{num_answers} answers per prompt: not {'; not '.join(failures)}]")
            return replace(choice, layout=layout, message=message)
        failures.append(f"{layout.name}: {'; '.join(problems)}")
        explicit = not (cfg.layout == "auto" and cfg.prefix_sharing is None)
        if explicit and layout == choice.layout:
            raise LayoutError(f"layout {layout.name} is not exact for rows of {num_answers} answers per prompt: "
                              f"{failures[-1]}. Use --layout auto or --layout single")
    raise LayoutError(f"no layout is exact for rows of {num_answers} answers per prompt: {'; '.join(failures)}")


def _problem(model: torch.nn.Module, layout: Layout, *, num_answers: int, pad_token_id: int, cfg: Any,
             choice: LayoutChoice, longest: int | None, precise: bool, device: Any, num_processes: int) -> str | None:
    """None when `layout` gives every answer of the probe records its single-sequence log-prob on `model`."""
    if layout == SINGLE:
        return None
    text = _text_config(_config_of(model))
    max_positions = getattr(text, "max_position_embeddings", None)
    length = probe_length(choice.attention, max_positions=max_positions, longest=longest)
    pairs = probe_pairs(int(getattr(text, "vocab_size", None) or 32), length, max_positions=max_positions,
                        avoid=[pad_token_id])
    records = probe_records(pairs, num_answers)
    options = dict(num_answers=num_answers, pad_token_id=pad_token_id, max_tokens_per_row=cfg.max_tokens_per_row,
                   choice=choice, device=device)
    with _mode(model, training=False):
        reference, lengths = _values(model, SINGLE, records, **options)
        try:
            values, _ = _values(model, layout, records, **options)
        except Exception as exc:  # a model that cannot take the layout's inputs
            return f"{model_class_name(model)} fails on it ({type(exc).__name__})"
    tolerance = _tolerances(reference, lengths, precise=precise, noise=0.0)
    gap = (values - reference).abs()
    excess = float((gap - tolerance).max()) if bool(torch.isfinite(gap).all()) else float("inf")
    if num_processes > 1:  # every process decides alike
        tensor = torch.tensor([excess], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        excess = float(tensor.item())
    if excess <= 0:
        return None
    return (f"{model_class_name(model)} gives log-probs {float(gap.max()):.3g} nats away from single sequences' "
            f"(tolerance {float(tolerance.max()):.2g})")
