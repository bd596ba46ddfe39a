"""The Accelerator and the one place DeepSpeed is imported.

Distribution lives in `accelerate_configs/*.yaml` (and the `ds_configs/*.json` they point at); this module only
adds what Accelerate does not do by itself: the gloo backend when CUDA is absent (DeepSpeed's CPU accelerator
needs it, and without it each process believes it is alone), and an inference-only DeepSpeed engine for a frozen
reference model, sharded like the policy under ZeRO-3, and DeepSpeed's universal-checkpoint conversion for a resume on
another number of processes (dpo/resize.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from dpo.errors import EXIT_PREEMPTED


def quiet_deepspeed_accelerator_probe() -> None:
    """For a process that does not use DeepSpeed. Accelerate and transformers import DeepSpeed whenever it is
    installed (unwrap_model, get_state_dict, save_pretrained), and DeepSpeed, finding no GPU, warns that it fell back
    to the CPU. Naming the CPU for it (what it would pick there) keeps that warning out of the log; with CUDA present
    it finds the GPU silently and nothing is set. A value the user set wins."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_accelerator(*, mixed_precision: str, gradient_accumulation_steps: int, max_grad_norm: float,
                      batch_size: int | None = None) -> Accelerator:
    """The run's Accelerator. Under DeepSpeed, the "auto" fields of the JSON are filled from the recipe here (the
    loop feeds batches itself, so Accelerate has no DataLoader to read the micro-batch size from)."""
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    if not use_deepspeed:
        quiet_deepspeed_accelerator_probe()
    launched = "WORLD_SIZE" in os.environ or use_deepspeed
    on_cpu = launched and not torch.cuda.is_available()
    # Only a launched (multi-process or DeepSpeed) run has a process group; a plain single process has none.
    handlers = [InitProcessGroupKwargs(backend="gloo")] if on_cpu else []
    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        kwargs_handlers=handlers,
        # Without cpu=True, Accelerate maps a multi-process DDP launch without CUDA to DistributedType.NO: every
        # process would train alone on its slice of the data, with no gradient all-reduce. cpu=True makes it
        # MULTI_CPU (DDP over gloo). DeepSpeed brings its own CPU accelerator and needs no flag.
        cpu=on_cpu and not use_deepspeed,
    )
    if accelerator.num_processes > 1 and accelerator.distributed_type == DistributedType.NO:
        raise RuntimeError(f"{accelerator.num_processes} processes were launched but Accelerate set up no "
                           f"distributed training: they would train independently. Check the accelerate config.")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        # The recipe's max_grad_norm is the one clipping knob: DeepSpeed clips inside its step.
        if ds_config.get("gradient_clipping", "auto") == "auto":
            ds_config["gradient_clipping"] = max_grad_norm
        # Accelerate derives train_batch_size (micro x accumulation x processes) and the accumulation from this.
        if batch_size is not None and ds_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds_config["train_micro_batch_size_per_gpu"] = batch_size
    return accelerator


def _resolve_auto(ds_config: dict[str, Any], model: torch.nn.Module, accelerator: Accelerator) -> dict[str, Any]:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    zero = ds_config.setdefault("zero_optimization", {})
    fills = {
        "reduce_bucket_size": (hidden or 1024) ** 2,
        "stage3_prefetch_bucket_size": int(0.9 * (hidden or 1024) ** 2),
        "stage3_param_persistence_threshold": 10 * (hidden or 1024),
    }
    for key, value in fills.items():
        if zero.get(key) == "auto":
            zero[key] = value
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        if ds_config.get(key) == "auto":
            ds_config.pop(key)
    if ds_config.get("gradient_clipping") == "auto":
        ds_config.pop("gradient_clipping")
    ds_config.setdefault("train_micro_batch_size_per_gpu", 1)
    return ds_config


def deepspeed_inference_engine(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """A frozen model as a DeepSpeed engine without optimizer: under ZeRO-3 its parameters are partitioned across
    processes exactly like the policy's and gathered layer by layer during the forward; under ZeRO-1/2 (which
    only shard optimizer state and gradients) a plain replicated copy is what each process needs."""
    import deepspeed

    ds_config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage != 3:
        return model.to(accelerator.device)
    ds_config.pop("optimizer", None)
    ds_config.pop("scheduler", None)
    ds_config["zero_optimization"].pop("offload_optimizer", None)
    ds_config = _resolve_auto(ds_config, model, accelerator)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    return engine


def gathered_parameters(params: list[torch.nn.Parameter], *, modify: bool) -> Any:
    """A context in which ZeRO-3-partitioned `params` are whole on every process (changes made on process 0 are
    scattered back on exit when `modify`); a no-op context for parameters DeepSpeed does not partition."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)


def deepspeed_all_to_all() -> Any:
    """DeepSpeed's differentiable all-to-all over dimension 0 (the operator its Ulysses attention uses), as
    `all_to_all(group, tensor)`, with DeepSpeed's communication set up over the running process group (a DDP run
    has none until now). Sequence parallelism (dpo/sequence_parallel.py) swaps tokens for heads with it."""
    import deepspeed.comm
    from deepspeed.sequence.layer import _dim_zero_all_to_all, register_all_to_all_group

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False,
                                        verbose=False)

    def all_to_all(group: Any, tensor: torch.Tensor) -> torch.Tensor:
        register_all_to_all_group(group)  # the operator finds its group by name
        return _dim_zero_all_to_all(group, tensor)

    return all_to_all


def release_process_groups(exit_code: int) -> None:
    """At the end of a process that ran distributed, while the interpreter is still whole: every process group
    destroyed and the last references to them dropped (DeepSpeed's all-to-all registry keeps the sequence-parallel
    groups). Left to the interpreter's own teardown, a gloo group's worker threads can outlive it and abort the
    process ("terminate called without an active exception", pytorch/pytorch#179291), which would turn a finished
    run's exit status into 134. Only after a run that ended together (0, or 75 after the preemption barrier): a rank
    leaving on an error must not wait for the others in a collective teardown."""
    ended_together = exit_code in (0, EXIT_PREEMPTED)
    if not ended_together or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    registry = sys.modules.get("deepspeed.sequence.layer")
    if registry is not None:
        registry._all_to_all_groups.clear()
    torch.distributed.destroy_process_group()
    gc.collect()


def deepspeed_checkpoint_globals() -> list[Any]:
    """The plain-data DeepSpeed classes its optimizer-state files pickle (an enum, a dataclass of ints, the loss
    scaler's attributes): allowed by a `weights_only` load of a checkpoint, nothing else is."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler]


def to_universal_checkpoint(engine_folder: Path, target: Path) -> None:
    """DeepSpeed's conversion of a ZeRO checkpoint (`engine_folder`, any number of processes and stage) into a
    universal one at `target` (per parameter: fp32 weights, Adam moments, step), which `checkpoint.load_universal`
    loads on any number of processes. One worker: the conversion stays in this process, where the caller's
    tensors-only `torch.load` applies to every file it reads."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(argparse.Namespace(
        input_folder=str(engine_folder), output_folder=str(target), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True))
