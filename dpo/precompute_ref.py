"""Reference log-probs computed once and stored with the shards, with a fingerprint of what produced them.

    python -m dpo.precompute_ref --model_path M --data_path D [--batch_size N] [--mixed_precision bf16] \
        [--average_log_prob true] [--splits train,eval] [--config recipe.yaml] [any dpo.train flag]
    accelerate launch --config_file accelerate_configs/zero3.yaml -m dpo.precompute_ref --config recipe.yaml

It takes the training config (the same flags and recipe mean the same thing), loads the reference exactly as
training's `--reference model` would (`ref_model_path`, else `model_path` with `lora_adapter_path` merged), and
adds `ref_chosen_logps` / `ref_rejected_logps` float32 columns to each split. The new shards (same number) and
`<split>/precomputed_ref.json` are written to a new folder that then replaces the split, so the values and their
fingerprint change together. Under several processes each computes a slice, the main process gathers and writes
every pair's value exactly once.

The fingerprint (dpo/fingerprint.py): sha256 of the reference's weight files in any format, of the SFT
adapter's (with adapter_config.json), of the tokenizer with its chat template, of the token columns;
`average_log_prob`, `mixed_precision` and the weights' dtype. Training refuses precomputed log-probs whose
fingerprint differs from the run (`check_precomputed`), naming what differs.

A run killed while swapping a split in (`train/` renamed to `train.old/`, the new folder not yet renamed to
`train/`) is repaired by the next run: the old split is restored, then recomputed; staging folders of killed runs
(`.tmp-<split>-ref`) are removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from dpo.config import ConfigError, TrainConfig, load_config
from dpo.config_help import format_help, wants_help
from dpo.data import REF_COLUMNS, eval_micro_batches, has_ref_columns, load_split
from dpo.errors import UserError, run_cli
from dpo.fingerprint import adapter_sha256, check_data_contract, data_sha256, tokenizer_sha256, weights_sha256
from dpo.layouts import choose_run_layout, data_shape, make_collate
from dpo.startup import check_inputs

FINGERPRINT_FILE = "precomputed_ref.json"
SPLITS = ("train", "eval")
FINGERPRINT_VERSION = 2  # 2: every weight format, the chat template

# ----------------------------------------------------------------------------------------- fingerprints


def splits_present(data_path: str | Path) -> list[str]:
    return [s for s in SPLITS if (Path(data_path) / s).is_dir()]


def run_fingerprint(cfg: TrainConfig, dataset: datasets.Dataset) -> dict[str, Any]:
    """What the precomputed values of `dataset` must have been computed with to be this run's reference."""
    from dpo.models import load_tokenizer, reference_source
    from dpo.precision import weights_label

    path, adapter_path = reference_source(cfg)
    return {
        "version": FINGERPRINT_VERSION,
        "reference_model": str(Path(path).resolve()),
        "weights_sha256": weights_sha256(path),
        "adapter_path": str(Path(adapter_path).resolve()) if adapter_path else None,
        "adapter_sha256": adapter_sha256(adapter_path) if adapter_path else None,
        "tokenizer_sha256": tokenizer_sha256(load_tokenizer(cfg)),
        "data_sha256": data_sha256(dataset),
        "num_pairs": len(dataset),
        "average_log_prob": cfg.average_log_prob,
        "mixed_precision": cfg.mixed_precision,
        "dtype": weights_label(cfg, path),  # the reference weights as loaded: dtype, and quantisation if any
    }


# (key, what differs, the setting that usually explains it). Paths are reported, never compared: a copied or moved
# model with the same weights is the same reference.
_COMPARED = (
    ("version", "fingerprint format", "a different dpo version wrote it"),
    ("weights_sha256", "reference model weights", "another model_path/ref_model_path, or the weights changed"),
    ("adapter_sha256", "SFT adapter merged into the reference", "another lora_adapter_path"),
    ("average_log_prob", "average_log_prob", "training and precomputing must both sum or both average"),
    ("data_sha256", "token columns of the data", "the shards changed after precomputing"),
    ("num_pairs", "number of pairs", "the shards changed after precomputing"),
    ("tokenizer_sha256", "tokenizer", "another tokenizer in data_path/tokenizer"),
    ("mixed_precision", "mixed_precision", "values computed in another precision"),
    ("dtype", "weights dtype", "values computed in another precision"),
)


def precomputed_mismatch(cfg: TrainConfig, split: str) -> str | None:
    """None when `split`'s precomputed log-probs are this run's reference; otherwise what is wrong, in words."""
    split_dir = Path(cfg.data_path) / split
    dataset = load_split(cfg.data_path, split)
    if dataset is None:
        return f"{split_dir} does not exist"
    if not has_ref_columns(dataset):
        return f"{split_dir} has no {'/'.join(REF_COLUMNS)} columns"
    path = split_dir / FINGERPRINT_FILE
    if not path.is_file():
        return f"{path} is missing, so nothing says what the {'/'.join(REF_COLUMNS)} columns were computed with"
    stored = json.loads(path.read_text())
    expected = run_fingerprint(cfg, dataset)
    diffs = []
    for key, what, why in _COMPARED:
        if stored.get(key) != expected[key]:
            shown = {"weights_sha256": "reference_model", "adapter_sha256": "adapter_path"}.get(key, key)
            old, new = stored.get(shown), expected[shown]
            if shown == key and key.endswith("sha256"):
                old, new = str(old)[:12], str(new)[:12]
            diffs.append(f"{what}: precomputed with {old!r}, this run has {new!r} ({why})")
    if not diffs:
        return None
    return f"{split}: " + "; ".join(diffs)


def check_precomputed(cfg: TrainConfig, split: str) -> None:
    """Raise UserError naming every difference between `split`'s precomputed fingerprint and this run."""
    problem = precomputed_mismatch(cfg, split)
    if problem is not None:
        raise UserError(
            f"precomputed reference log-probs in {cfg.data_path} do not match this run: {problem}. Recompute them "
            f"with `python -m dpo.precompute_ref` and the same config as training (--model_path {cfg.model_path} "
            f"--data_path {cfg.data_path} --average_log_prob {str(cfg.average_log_prob).lower()} "
            f"--mixed_precision {cfg.mixed_precision}), or train with --reference model")


# ------------------------------------------------------------------------------------------- computing


def reference_logps_of_split(reference: Any, dataset: datasets.Dataset, collate: Any, cfg: TrainConfig,
                             accelerator: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(chosen, rejected) float32 [N] on the main process (None elsewhere); every pair computed by exactly one
    process. All processes run the same number of equal batches (ZeRO-3 needs every rank in every forward)."""
    batches = eval_micro_batches(len(dataset), batch_size=cfg.eval_batch_size or cfg.batch_size,
                                 num_processes=accelerator.num_processes, process_index=accelerator.process_index)
    rows = []
    for indices, weights in batches:
        batch = collate([dataset[i] for i in indices], weights).to(accelerator.device)
        chosen, rejected = reference.logps(None, batch)
        rows.append(torch.stack([torch.tensor(indices, dtype=torch.float64, device=chosen.device),
                                 batch.pair_weight.double(), chosen.double(), rejected.double()], dim=1))
    local = torch.cat(rows) if rows else torch.zeros((0, 4), dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(local) if accelerator.num_processes > 1 else local
    if not accelerator.is_main_process:
        return None
    chosen = np.full(len(dataset), np.nan, dtype=np.float64)
    rejected = np.full(len(dataset), np.nan, dtype=np.float64)
    for index, weight, c, r in gathered.cpu().tolist():
        if weight == 0:  # a filler pair of the last batch
            continue
        i = int(index)
        if not math.isnan(chosen[i]):
            raise RuntimeError(f"pair {i} was computed twice")
        chosen[i], rejected[i] = c, r
    missing = np.flatnonzero(np.isnan(chosen))
    if len(missing):
        raise RuntimeError(f"{len(missing)} pairs were not computed (first: {missing[:5].tolist()})")
    return chosen.astype(np.float32), rejected.astype(np.float32)


def write_split_with_reference(split_dir: Path, dataset: datasets.Dataset, chosen: np.ndarray,
                               rejected: np.ndarray, fingerprint: dict[str, Any]) -> None:
    """The split with the two columns (replacing older ones) and its fingerprint, swapped in as one folder."""
    from dpo.models import atomic_replace_dir

    state = json.loads((split_dir / "state.json").read_text())
    num_shards = max(1, len(state.get("_data_files", [])))
    updated = dataset.remove_columns([c for c in REF_COLUMNS if c in dataset.column_names])
    updated = updated.add_column(REF_COLUMNS[0], chosen, feature=datasets.Value("float32"))
    updated = updated.add_column(REF_COLUMNS[1], rejected, feature=datasets.Value("float32"))
    tmp = split_dir.with_name(f".tmp-{split_dir.name}-ref")
    shutil.rmtree(tmp, ignore_errors=True)
    updated.save_to_disk(str(tmp), num_shards=num_shards)
    (tmp / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n")
    atomic_replace_dir(tmp, split_dir)


def recover_interrupted_swap(data_path: str | Path, *, log: Any = print) -> None:
    """Undo what a killed run left between the two renames of `atomic_replace_dir`, and its staging folders."""
    root = Path(data_path)
    for split in SPLITS:
        split_dir, old = root / split, root / f"{split}.old"
        if old.is_dir() and not split_dir.exists():
            old.rename(split_dir)
            log(f"[precompute_ref] restored {split_dir} from {old.name} (a run was killed while replacing it)")
        elif old.is_dir():
            shutil.rmtree(old)  # killed after the new split was in place: the old one is no longer needed
        stale = root / f".tmp-{split}-ref"
        if stale.exists():
            shutil.rmtree(stale)
            log(f"[precompute_ref] removed {stale.name}, left by a killed run")


def wait_for_recovery(data_path: str | Path, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    root = Path(data_path)
    while any((root / f"{s}.old").is_dir() and not (root / s).exists() for s in SPLITS):
        if time.monotonic() > deadline:
            return
        time.sleep(0.2)


def precompute(cfg: TrainConfig, splits: list[str]) -> dict[str, dict[str, Any]]:
    """Compute and store the reference log-probs of `splits`; returns each split's fingerprint (main process)."""
    from dpo.distributed import build_accelerator
    from dpo.models import load_tokenizer
    from dpo.reference import build_reference

    accelerator = build_accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=1,
                                    max_grad_norm=cfg.max_grad_norm, batch_size=cfg.eval_batch_size or cfg.batch_size)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    tokenizer = load_tokenizer(cfg)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reference = build_reference("model", cfg, accelerator)  # exactly training's on-the-fly reference
    present = [load_split(cfg.data_path, s) for s in splits]
    choice = choose_run_layout([reference.model], cfg, accelerator, pad_token_id=pad_id,
                               data=data_shape(*present))
    log(choice.message.replace("[dpo]", "[precompute_ref]", 1))
    collate = make_collate(choice.layout, pad_token_id=pad_id, max_tokens_per_row=cfg.max_tokens_per_row,
                           attention=choice.attention)
    fingerprints = {}
    for split in splits:
        dataset = load_split(cfg.data_path, split)
        if dataset is None:
            raise UserError(f"{cfg.data_path}/{split}: missing; run data_prep first")
        start = time.perf_counter()
        result = reference_logps_of_split(reference, dataset, collate, cfg, accelerator)
        if accelerator.is_main_process:
            fingerprint = run_fingerprint(cfg, dataset)
            fingerprint["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            fingerprint["num_processes"] = accelerator.num_processes
            write_split_with_reference(Path(cfg.data_path) / split, dataset, *result, fingerprint)
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
        check_data_contract(cfg, {s: load_split(cfg.data_path, s) for s in chosen})
        precompute(cfg, chosen)

    return run_cli("dpo.precompute_ref", body)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
