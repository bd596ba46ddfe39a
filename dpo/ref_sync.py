"""TR-DPO: the frozen-copy reference follows the policy, and checkpoints carry it so that resume stays exact.

    sync_reference(unwrapped_policy, reference.model, alpha=cfg.ref_model_mixup_alpha)   # every N optimizer steps
    save_reference(reference.model, checkpoint_dir, accelerator)    # reference.safetensors in the checkpoint
    load_reference(reference.model, checkpoint_dir, accelerator)

Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", Eq. 5 (soft update,
ref <- alpha * policy + (1 - alpha) * ref) and Eq. 6 (hard update, alpha = 1), every `ref_model_sync_steps`
optimizer steps, as TRL's `sync_ref_model`. Only the frozen copy (`--reference model`) can be synced: a LoRA
reference is the base weights under the adapter, and a precomputed one is fixed; dpo/config.py refuses both.
Parameters only (buffers such as rotary frequencies are not trained). Under ZeRO-3 both models' parameters are
gathered, updated on process 0 and scattered back, like TRL does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dpo.atomic import write_file_atomic
from dpo.distributed import gathered_parameters

REFERENCE_FILE = "reference.safetensors"


def _module(model: Any) -> torch.nn.Module:
    """The model inside a DeepSpeed inference engine (or the model itself)."""
    return getattr(model, "module", model)


def _is_writer() -> bool:
    """Process 0 writes gathered ZeRO-3 parameters (they are scattered from it); every process otherwise."""
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


@torch.no_grad()
def sync_reference(policy: torch.nn.Module, reference_model: Any, *, alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, parameter by parameter (the same architecture, same order)."""
    policy_params = list(_module(policy).parameters())
    ref_params = list(_module(reference_model).parameters())
    if len(policy_params) != len(ref_params):
        raise ValueError(f"sync_ref_model: the policy has {len(policy_params)} parameter tensors and the reference "
                         f"{len(ref_params)}; syncing needs the same architecture (ref_model_path)")
    zero3 = any(hasattr(p, "ds_id") for p in policy_params + ref_params)
    for policy_param, ref_param in zip(policy_params, ref_params):
        # One pair of tensors gathered at a time: never the whole model on one process.
        with gathered_parameters([policy_param, ref_param], modify=True):
            if zero3 and not _is_writer():
                continue
            if policy_param.shape != ref_param.shape:
                raise ValueError(f"sync_ref_model: parameter shapes differ ({tuple(policy_param.shape)} vs "
                                 f"{tuple(ref_param.shape)}); the reference must have the policy's architecture")
            ref_param.data.mul_(1.0 - alpha).add_(policy_param.data.to(ref_param.dtype), alpha=alpha)


@torch.no_grad()
def save_reference(reference_model: Any, folder: str | Path, accelerator: Any) -> None:
    """Write the (synced) reference's parameters to folder/reference.safetensors (all processes call this)."""
    state = {}
    for name, param in _module(reference_model).named_parameters():
        with gathered_parameters([param], modify=False):
            if accelerator.is_main_process:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    if accelerator.is_main_process:
        write_file_atomic(Path(folder) / REFERENCE_FILE, lambda path: save_file(state, str(path)))


@torch.no_grad()
def load_reference(reference_model: Any, folder: str | Path, accelerator: Any) -> None:
    """Restore the reference's parameters from folder/reference.safetensors (all processes call this)."""
    path = Path(folder) / REFERENCE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume_from_checkpoint: {path} is missing; sync_ref_model updates the reference, so "
                                f"a checkpoint without it cannot resume exactly (was it written without "
                                f"sync_ref_model?)")
    state = load_file(str(path))
    params = dict(_module(reference_model).named_parameters())
    if set(state) != set(params):
        raise ValueError(f"{path}: holds parameters {sorted(set(state) ^ set(params))[:5]} that do not match the "
                         f"reference model's")
    for name, param in params.items():
        with gathered_parameters([param], modify=True):
            if _is_writer() or not hasattr(param, "ds_id"):
                param.data.copy_(state[name].to(param.device, param.dtype))
