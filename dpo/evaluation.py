"""What one evaluation covers, in what order and batches, and the line the log gets when it is done.

    plan = eval_plan(eval_ds, cfg, num_processes=2, process_index=0)
    for (indices, weights), pairs in zip(plan.batches, plan.global_pairs):  # dataset indices; pairs: progress
        ...

- Which pairs: all of the eval split, or with `eval_max_pairs` N a fixed subset of N drawn with `seed`, the same at
  every evaluation of the run (and of a resumed run), so the points of an eval curve compare like with like.
- In what order: longest pair first. Metrics are means over pairs, so the order changes nothing but cost: pairs of
  like length share batches (less padding, fuller packed rows), and the largest batch comes first, so a batch that
  does not fit in memory fails at once rather than at the end (with `eval_on_start`, before any training).
- In what batches: `eval_batch_size`, by default twice the training batch. An eval forward keeps no activations
  for backward and runs while the gradients are freed, so twice the pairs normally fit in less memory than a
  training step holds; where they do not, the first batch stops the run with a line naming `--eval_batch_size`
  (`dpo.train.evaluate`). No batch is filled up with repeated pairs: only a process whose share has run out runs
  one weight-0 pair (the shortest), since under ZeRO-3 every process must take part in every forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import pyarrow.compute as pc
import torch

from dpo.data import eval_micro_batches

EVAL_BATCH_FACTOR = 2  # default eval batch = this x the training batch


@dataclass(frozen=True)
class EvalPlan:
    batches: list[tuple[list[int], list[float]]]  # this process's batches: dataset indices and weights (0: filler)
    global_pairs: list[int]  # real pairs of each global batch, all processes together (what the progress bar counts)
    num_pairs: int  # real pairs of the evaluation, all processes together
    batch_size: int  # pairs per process per forward


def eval_batch_size(cfg: Any) -> int:
    return cfg.eval_batch_size or EVAL_BATCH_FACTOR * cfg.batch_size


def eval_subset(num_pairs: int, *, max_pairs: int | None, seed: int) -> list[int]:
    """Indices of the pairs an evaluation covers, ascending: all, or `max_pairs` of them drawn without replacement
    by a generator seeded with `seed` (the same subset on every process and at every evaluation)."""
    if max_pairs is None or max_pairs >= num_pairs:
        return list(range(num_pairs))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num_pairs, generator=generator)[:max_pairs].tolist())


def pair_lengths(dataset: datasets.Dataset) -> list[int]:
    """Tokens of each pair's longest sequence (prompt + the longer answer), from the Arrow columns without
    materialising the token lists."""
    prompt = pc.list_value_length(dataset.data.column("prompt_ids"))
    answer = pc.max_element_wise(pc.list_value_length(dataset.data.column("chosen_ids")),
                                 pc.list_value_length(dataset.data.column("rejected_ids")))
    return pc.add(prompt, answer).to_pylist()


def longest_first(indices: list[int], lengths: list[int]) -> list[int]:
    """`indices` by descending length; equal lengths keep their order."""
    return sorted(indices, key=lambda i: -lengths[i])


def eval_plan(dataset: datasets.Dataset, cfg: Any, *, num_processes: int, process_index: int) -> EvalPlan:
    """This process's share of one evaluation (module docstring): the subset, longest first, in batches."""
    order = longest_first(eval_subset(len(dataset), max_pairs=cfg.eval_max_pairs, seed=cfg.seed),
                          pair_lengths(dataset))
    size = eval_batch_size(cfg)
    batches = []
    for positions, weights in eval_micro_batches(len(order), batch_size=size, num_processes=num_processes,
                                                 process_index=process_index):
        real = [order[p] for p, w in zip(positions, weights) if w > 0]
        batches.append((real, [1.0] * len(real)) if real else ([order[-1]], [0.0]))
    global_micro = size * num_processes
    global_pairs = [min(global_micro, len(order) - k * global_micro) for k in range(len(batches))]
    return EvalPlan(batches=batches, global_pairs=global_pairs, num_pairs=len(order), batch_size=size)


def eval_summary(step: int | None, metrics: dict[str, float]) -> str:
    """The log line of an evaluation: where, how many pairs, how long, and its headline metrics."""
    shown = [f"{name} {metrics[name]:.4f}" for name in ("loss", "rewards/accuracies", "logps/accuracies")
             if name in metrics]
    where = "" if step is None else f" at step {step}"
    return (f"[dpo] eval{where}: {metrics['num_pairs']:.0f} pairs in {metrics['runtime']:.1f} s "
            f"({metrics['pairs_per_second']:.2f} pairs/s); " + ", ".join(shown))
