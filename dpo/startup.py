"""What a training run checks before it writes anything, and the output folder's ownership rules.

    check_inputs(cfg)                        model, reference, adapter and data paths exist and look right
    check_output_dir(cfg)                    a fresh run refuses a folder holding an earlier run (unless overwriting)
    clear_previous_run(output_dir)           --overwrite_output_dir: removes only what a run writes
    remove_stale_staging(output_dir)         staging folders of a run killed while saving
    check_resume_config(stored, cfg, log)    resume is the same run, or refused with the list of differences
    apply_learning_rate(scheduler, optimizer, lr)   an allowed learning-rate change takes effect on resume

Every refusal is a `UserError` (one line, exit 2) that says what to do.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

from dpo.atomic import interrupted_replacement, is_staging_name, recover_all
from dpo.config import config_to_dict
from dpo.errors import UserError

# What a run writes into output_dir (dpo.report adds report.png), and the staging folders of `dpo.atomic` beside
# them; nothing else there is ever removed.
RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "tensorboard", "final", "final_merged", "report.png")
RUN_OUTPUT_GLOBS = ("checkpoint-*", ".tmp-*")
PATH_KEYS = ("model_path", "data_path", "ref_model_path", "lora_adapter_path")
# Keys a resumed run may change: how long it runs, how often it logs, evaluates and saves, where it reports, and
# settings that give the same numbers (eval batch, logits chunking, recomputing activations).
RESUME_HARMLESS = frozenset({
    "max_steps", "num_epochs", "logging_steps", "eval_steps", "save_steps", "save_total_limit", "max_logratio",
    "early_stopping_patience", "early_stopping_min_delta", "eval_batch_size", "eval_on_start",
    "logits_chunk_size", "gradient_checkpointing", "output_dir", "run_name", "use_wandb", "wandb_project",
    "resume_from_checkpoint", "resume_allow_changes", "overwrite_output_dir", "trust_remote_code",
    "attn_implementation", "save_on_signal", "do_eval", "dataset_num_proc", "data_cache_dir",
})


def check_inputs(cfg: Any) -> None:
    if not cfg.model_path or not cfg.data_path:
        raise UserError("model_path and data_path are required (--model_path DIR --data_path DIR)")
    if not (Path(cfg.model_path) / "config.json").is_file():
        what = "does not exist" if not Path(cfg.model_path).exists() else "holds no config.json (not a model folder)"
        raise UserError(f"model_path: {cfg.model_path} {what}; models load from local Hugging Face folders only")
    if cfg.ref_model_path and not Path(cfg.ref_model_path).is_dir():  # a precomputed reference only hashes it
        raise UserError(f"ref_model_path: {cfg.ref_model_path} does not exist")
    if cfg.lora_adapter_path and not (Path(cfg.lora_adapter_path) / "adapter_config.json").is_file():
        raise UserError(f"lora_adapter_path: {cfg.lora_adapter_path} holds no adapter_config.json")
    moved_aside = interrupted_replacement(Path(cfg.data_path) / "train")
    if moved_aside is not None:
        raise UserError(f"data_path: {cfg.data_path}/train was being replaced by a dpo.precompute_ref that was "
                        f"killed ({moved_aside.name}/ is left); run dpo.precompute_ref again to restore and complete "
                        f"it")
    if not (Path(cfg.data_path) / "train").is_dir():
        what = "does not exist" if not Path(cfg.data_path).exists() else "has no train/ split"
        raise UserError(f"data_path: {cfg.data_path} {what}; run data_prep first (python -m data_prep --input ... "
                        f"--tokenizer {cfg.model_path or 'MODEL'} --output DIR)")


def previous_run_outputs(output_dir: str | Path) -> list[Path]:
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [root / name for name in RUN_OUTPUTS if (root / name).exists()]
    found += [p for pattern in RUN_OUTPUT_GLOBS for p in sorted(root.glob(pattern))]
    found += [p for p in sorted(root.iterdir()) if is_staging_name(p.name)]
    return found


def check_output_dir(cfg: Any) -> None:
    """A fresh run into a folder that holds an earlier run is refused unless --overwrite_output_dir."""
    if cfg.resume_from_checkpoint or cfg.overwrite_output_dir:
        return
    found = previous_run_outputs(cfg.output_dir)
    if found:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise UserError(f"output_dir {cfg.output_dir} already holds a run ({names}); resume it with "
                        f"--resume_from_checkpoint latest, replace it with --overwrite_output_dir, or choose "
                        f"another --output_dir")


def clear_previous_run(output_dir: str | Path, *, log: Callable[[str], None]) -> None:
    """Remove an earlier run's checkpoints, metrics, TensorBoard logs and final models; nothing else."""
    found = previous_run_outputs(output_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if found:
        log(f"[dpo] --overwrite_output_dir: removed the earlier run's {', '.join(p.name for p in found)}")


def remove_stale_staging(output_dir: str | Path, *, log: Callable[[str], None]) -> None:
    """Staging folders of a run killed while saving: checkpoints (.tmp-checkpoint-N: never complete, never read)
    and the owner-named ones of `dpo.atomic` (final/, final_merged/; a replacement killed between its renames is
    undone)."""
    for path in sorted(Path(output_dir).glob(".tmp-*")):
        shutil.rmtree(path, ignore_errors=True)
        log(f"[dpo] removed {path.name}, left by a run killed while saving")
    for action in recover_all(Path(output_dir)):
        log(f"[dpo] {action}")


def resolved_config(cfg: Any) -> dict[str, Any]:
    """The config as stored with a checkpoint: paths made absolute, so another working directory is no change."""
    values = config_to_dict(cfg)
    for key in PATH_KEYS:
        if values.get(key):
            values[key] = str(Path(values[key]).resolve())
    return values


def check_resume_config(stored: dict[str, Any] | None, cfg: Any, *, log: Callable[[str], None]) -> list[str]:
    """Refuse a resume whose settings change the run's meaning, naming every difference, unless
    --resume_allow_changes; log the harmless ones. Returns the keys that differ."""
    if stored is None:
        raise UserError("the checkpoint stores no run_config.json, so this cannot be shown to be the same run")
    current = resolved_config(cfg)
    changed = sorted(k for k in current if k in stored and stored[k] != current[k])
    changed += sorted(k for k in stored if k not in current)  # a key this version no longer has
    meaning = [k for k in changed if k not in RESUME_HARMLESS]
    harmless = [k for k in changed if k in RESUME_HARMLESS and k not in ("resume_from_checkpoint",)]

    def show(key: str) -> str:
        return f"{key} {stored.get(key)!r} -> {current.get(key)!r}"

    if harmless:
        log(f"[dpo] resume: changed {'; '.join(show(k) for k in harmless)}")
    if meaning and not cfg.resume_allow_changes:
        raise UserError(f"resume_from_checkpoint: this run differs from the checkpoint's in "
                        f"{'; '.join(show(k) for k in meaning)}; resuming would make a hybrid run. Use the "
                        f"checkpoint's settings (its run_config.json), start a fresh run, or pass "
                        f"--resume_allow_changes to resume anyway")
    if meaning:
        log(f"[dpo] WARNING: resuming with changed settings (--resume_allow_changes): "
            f"{'; '.join(show(k) for k in meaning)}")
    return changed


def apply_learning_rate(scheduler: Any, optimizer: Any, learning_rate: float) -> None:
    """Make a changed peak learning rate take effect at the scheduler's current step (a restored scheduler would
    otherwise keep the checkpoint's)."""
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    for group, lr_lambda in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = learning_rate
        group["lr"] = learning_rate * lr_lambda(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
