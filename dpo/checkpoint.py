"""Checkpoints that resume exactly, and the final export.

`checkpoint-STEP/` holds Accelerate's state (model, optimizer, RNG states of every process, the LR scheduler
registered for checkpointing) plus `trainer_state.json` (step, early-stopping state). It is written under a
temporary name and renamed when complete, so a crash never leaves a directory that looks like a checkpoint.
The data position needs no saving: the order of every epoch is a function of (seed, epoch), so the step says it.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.match(p.name))
             and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume_path(output_dir: str | Path, resume: str) -> Path:
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint: latest, but {output_dir} holds no complete checkpoint")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {resume} is not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(accelerator: Any, output_dir: str | Path, state: TrainerState, *, save_total_limit: int | None,
                    save_extra: Callable[[Path], None] | None = None) -> Path:
    """Every process calls this (DeepSpeed saves its shards from each); the main process renames and rotates.

    `save_extra(folder)` (called on every process) adds files to the checkpoint before it is published (TR-DPO's
    synced reference)."""
    root = Path(output_dir)
    final = root / f"checkpoint-{state.step}"
    tmp = root / f".tmp-checkpoint-{state.step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if save_extra is not None:
        save_extra(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if save_total_limit:
            for old in list_checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Any, path: str | Path) -> TrainerState:
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))
