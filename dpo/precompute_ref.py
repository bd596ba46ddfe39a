"""Reference log-probs computed once and stored with the shards, with a fingerprint of what produced them.

    python -m dpo.precompute_ref --model_path M --data_path D [--batch_size N] [--mixed_precision bf16] \
        [--average_log_prob true] [--splits train,eval] [--config recipe.yaml] [any dpo.train flag]
    accelerate launch --config_file accelerate_configs/zero3.yaml -m dpo.precompute_ref --config recipe.yaml

It takes the training config (the same flags and recipe mean the same thing), checks the data against its
prep_report.json (`dpo.contract`), builds the reference exactly as training's `--reference model` would
(`dpo.reference`: `ref_model_path`, else `model_path` with `lora_adapter_path` merged), and adds
`ref_chosen_logps` / `ref_rejected_logps` float32 columns to each split. The new shards (same number) and
`<split>/precomputed_ref.json` (`dpo.reference.split_fingerprint`) are written to a staging folder that then
replaces the split (`dpo.atomic`), so the values and their fingerprint change together. Under several processes
each computes a slice, the main process gathers and writes every pair's value exactly once. Training compares the
fingerprint with the run (`dpo.reference.resolve_reference_kind`).

A run killed while swapping a split in (`train/` moved aside, the new folder not yet in its place) is repaired by
the next run: the old split is restored, then recomputed; staging folders of killed runs are removed
(`dpo.atomic.recover`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from data_prep.ranked import best_and_worst
from dpo import sequence_parallel as sp
from dpo.atomic import interrupted_replacement, recover, staged_folder
from dpo.attention import resolve_for_run
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.config_help import format_help, wants_help
from dpo.contract import REF_COLUMNS, SPLITS, check_data_contract
from dpo.data import eval_micro_batches, load_split
from dpo.distributed import build_accelerator, release_process_groups
from dpo.errors import UserError, run_cli
from dpo.layouts import check_split_rows, choose_run_layout, data_shape
from dpo.listwise_step import check_unsplit, is_ranked, make_run_collate, ranked_layout
from dpo.models import load_tokenizer
from dpo.progress import quiet_library_progress
from dpo.ranked_batch import REF_ANSWER_COLUMN, RankedBatch
from dpo.reference import FINGERPRINT_FILE, Reference, build_reference, run_fingerprint, split_fingerprint
from dpo.startup import check_inputs


def splits_present(data_path: str | Path) -> list[str]:
    return [s for s in SPLITS if (Path(data_path) / s).is_dir()]


def reference_logps_of_split(reference: Reference, dataset: datasets.Dataset, collate: Any, cfg: TrainConfig,
                             accelerator: Any, *, sequence_group: sp.SequenceGroup | None = None
                             ) -> np.ndarray | None:
    """[N, V] float32 on the main process (None elsewhere): (chosen, rejected) of each pair, or for k-answer data
    each answer's value in input order (K columns, NaN past a record's own k); every record computed by exactly one
    process (one sequence-parallel group, whose lead reports it). All processes run the same number of equal batches
    (ZeRO-3 needs every rank in every forward)."""
    data_world, data_rank = sp.data_parallel(sequence_group, num_processes=accelerator.num_processes,
                                             process_index=accelerator.process_index)
    batches = eval_micro_batches(len(dataset), batch_size=cfg.eval_batch_size or cfg.batch_size,
                                 num_processes=data_world, process_index=data_rank)
    rows = []
    for indices, weights in batches:
        batch = collate([dataset[i] for i in indices], weights).to(accelerator.device)
        first, second = reference.logps(batch)
        if isinstance(batch, RankedBatch):  # [B, K], absent answers NaN
            values = batch.unflatten(first, second).double()
            values = torch.where(torch.isnan(batch.scores.to(values.device)), torch.nan, values)
        else:
            values = torch.stack([first.double(), second.double()], dim=1)
        weight = batch.pair_weight if sequence_group is None else sp.counted(batch)[0]  # split: the group's lead
        rows.append(torch.cat([torch.tensor(indices, dtype=torch.float64, device=values.device)[:, None],
                               weight.double()[:, None].to(values.device), values], dim=1))
    width = 2 + (rows[0].shape[1] - 2 if rows else 2)
    local = torch.cat(rows) if rows else torch.zeros((0, width), dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local) if accelerator.num_processes > 1 else local
    if not accelerator.is_main_process:
        return None
    values = np.full((len(dataset), gathered.shape[1] - 2), np.nan, dtype=np.float64)
    for index, weight, *row in gathered.cpu().tolist():
        if weight == 0:  # a filler pair of the last batch
            continue
        i = int(index)
        if not math.isnan(values[i, 0]):
            raise RuntimeError(f"pair {i} was computed twice")
        values[i] = row
    missing = np.flatnonzero(np.isnan(values[:, 0]))
    if len(missing):
        raise RuntimeError(f"{len(missing)} pairs were not computed (first: {missing[:5].tolist()})")
    return values.astype(np.float32)


def write_split_with_reference(split_dir: Path, dataset: datasets.Dataset, values: np.ndarray,
                               fingerprint: dict[str, Any]) -> None:
    """The split with the reference columns (replacing older ones) and its fingerprint, swapped in as one folder.
    Pairs: ref_chosen_logps / ref_rejected_logps. k answers: `ref_logps` (one value per answer, input order) and,
    for the pairwise columns' best and worst answer, ref_chosen_logps / ref_rejected_logps."""
    state = json.loads((split_dir / "state.json").read_text())
    num_shards = max(1, len(state.get("_data_files", [])))
    updated = dataset.remove_columns([c for c in (*REF_COLUMNS, REF_ANSWER_COLUMN) if c in dataset.column_names])
    if "responses_ids" in dataset.column_names:
        answers = [row[:len(scores)].tolist() for row, scores in zip(values, dataset["scores"])]
        ends = [best_and_worst(scores) for scores in dataset["scores"]]
        chosen = np.array([a[best] for a, (best, _) in zip(answers, ends)], dtype=np.float32)
        rejected = np.array([a[worst] for a, (_, worst) in zip(answers, ends)], dtype=np.float32)
        updated = updated.add_column(REF_ANSWER_COLUMN, answers,
                                     feature=datasets.List(datasets.Value("float32")))
    else:
        chosen, rejected = values[:, 0], values[:, 1]
    updated = updated.add_column(REF_COLUMNS[0], chosen, feature=datasets.Value("float32"))
    updated = updated.add_column(REF_COLUMNS[1], rejected, feature=datasets.Value("float32"))
    with staged_folder(split_dir) as staging:
        updated.save_to_disk(str(staging), num_shards=num_shards)
        (staging / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")


def recover_interrupted_swap(data_path: str | Path, *, log: Any = print) -> None:
    """Undo what a killed run left between the two renames of a split's replacement, and its staging folders."""
    for split in SPLITS:
        for action in recover(Path(data_path) / split):
            log(f"[precompute_ref] {action}")


def wait_for_recovery(data_path: str | Path, timeout_s: float = 120.0) -> None:
    """Other processes wait while the first one puts back a split a killed run had moved aside."""
    deadline = time.monotonic() + timeout_s
    root = Path(data_path)
    while any(interrupted_replacement(root / s) is not None for s in SPLITS):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


def precompute(cfg: TrainConfig, splits: list[str]) -> dict[str, dict[str, Any]]:
    """Compute and store the reference log-probs of `splits`; returns each split's fingerprint (main process)."""
    quiet_library_progress()  # in a log file: no loading bars from transformers and datasets
    accelerator = build_accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1,
                                    max_grad_norm=cfg.max_grad_norm, batch_size=cfg.eval_batch_size or cfg.batch_size)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    cfg = resolve_for_run(sp.splittable_request(cfg), device_type=accelerator.device.type,
                          needs_backward=False)  # a no-grad forward
    sp.check_models(cfg, num_processes=accelerator.num_processes)
    data = check_data_contract(cfg, {s: load_split(cfg.data_path, s) for s in SPLITS}, log=log)
    missing = [s for s in splits if s not in data.splits]
    if missing:
        raise UserError(f"{cfg.data_path}/{missing[0]}: missing; run data_prep first")
    if is_ranked(replace(cfg, listwise_loss=None), *data.splits.values()):  # before any model is loaded
        check_unsplit(cfg)
    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reference = build_reference("model", cfg, accelerator)  # exactly training's on-the-fly reference
    shape = data_shape(*(data.splits[s] for s in splits))
    choice = choose_run_layout([reference.model], cfg, accelerator, pad_token_id=pad_id, data=shape)
    choice = ranked_layout([reference.model], choice, replace(cfg, listwise_loss=None), accelerator,
                           pad_token_id=pad_id, datasets_=tuple(data.splits[s] for s in splits),
                           longest=shape.longest)
    log(choice.message.replace("[dpo]", "[precompute_ref]", 1))
    collate = make_run_collate(choice, replace(cfg, listwise_loss=None), pad_token_id=pad_id,
                               datasets_=tuple(data.splits[s] for s in splits))  # k answers when the data has them
    sequence_group = sp.setup(cfg.sequence_parallel_size)
    if sequence_group is not None:  # after the layout probe (whole rows); split rows checked against them
        log(check_split_rows([reference.model], choice, cfg, accelerator, group=sequence_group,
                             pad_token_id=pad_id).replace("[dpo]", "[precompute_ref]", 1))
        collate = sp.splitting(collate, sequence_group, choice.attention, mask_form=choice.mask_form)
    run = run_fingerprint(cfg) if accelerator.is_main_process else {}
    fingerprints = {}
    for split in splits:
        dataset = data.splits[split]
        start = time.perf_counter()
        result = reference_logps_of_split(reference, dataset, collate, cfg, accelerator,
                                          sequence_group=sequence_group)
        if accelerator.is_main_process:
            fingerprint = split_fingerprint(run, data, split)
            fingerprint["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            fingerprint["num_processes"] = accelerator.num_processes
            write_split_with_reference(Path(cfg.data_path) / split, dataset, result, fingerprint)
            fingerprints[split] = fingerprint
            log(f"[precompute_ref] {split}: {len(dataset)} pairs in {time.perf_counter() - start:.1f}s "
                f"-> {Path(cfg.data_path) / split}")
        accelerator.wait_for_everyone()  # no process reads the split while the main one swaps it
    return fingerprints


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(format_help("python -m dpo.precompute_ref", __doc__.split("\n\n")[0], extra_flags=(
            ("--splits train,eval", "the splits to compute (default: every split present)"),)), end="")
        return 0
    splits: list[str] | None = None
    if "--splits" in argv:
        at = argv.index("--splits")
        splits = [s for s in argv[at + 1].split(",") if s] if at + 1 < len(argv) else []
        del argv[at:at + 2]
    for i, arg in enumerate(argv):
        if arg.startswith("--splits="):
            splits = [s for s in arg.split("=", 1)[1].split(",") if s]
            del argv[i]
            break

    def body() -> None:
        cfg = load_config(argv)
        if cfg.data_path and Path(cfg.data_path).is_dir():
            if os.environ.get("RANK", "0") == "0":
                recover_interrupted_swap(cfg.data_path)
            else:  # the first process is restoring it
                wait_for_recovery(cfg.data_path)
        check_inputs(cfg)
        chosen = splits if splits is not None else splits_present(cfg.data_path)
        unknown = [s for s in chosen if s not in SPLITS]
        if unknown or not chosen:
            raise ConfigError(f"--splits must name some of {', '.join(SPLITS)}, got {chosen}")
        precompute(cfg, chosen)

    return run_cli("dpo.precompute_ref", body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = main()
    release_process_groups(code)
    sys.exit(code)
