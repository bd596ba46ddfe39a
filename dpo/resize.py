"""Resume on another number of processes (GPUs, nodes) or another ZeRO stage, at the same global batch.

    plan = plan_run(cfg, accelerator, resume_path, log=log)     # before accelerator.prepare
    with engine_state(accelerator, resume_path, plan, out_dir) as folder:
        state = load_checkpoint(..., engine_state_dir=folder, restore_rng=not plan.resized)

Every checkpoint records how it was written in `topology.json`: processes, engine (DeepSpeed or torch), ZeRO stage,
per-device batch, accumulation, and the data position counted in pairs. A resume keeps the checkpoint's global batch
(pairs per optimizer step): the data order of an epoch is a function of (seed, epoch) and every optimizer step takes
the next `global batch` pairs of it, whatever the split over processes, so the step says which pairs are next. The
per-device batch of the recipe is kept when it divides the new share (global batch / processes), the accumulation
fills the rest; otherwise the largest smaller batch that divides it is used. A global batch that M processes cannot
share evenly is refused.

The model and optimizer state move through DeepSpeed's own topology-free format, the universal checkpoint: the
ZeRO shards of N processes are merged per parameter (fp32 weights, Adam moments, step) by
`deepspeed.checkpoint.ds_to_universal` into a staging folder of the output dir, which the new engine loads with
`checkpoint.load_universal` and removes. Every file read in the conversion is loaded tensors-only, as a normal resume
is. A torch checkpoint (one process or DDP) holds whole tensors already and loads at any process count.

The generators of each process are restored exactly when nothing changed; after a resize the processes no longer
correspond, so each reseeds from (seed, step, process index): deterministic, and distinct per process (only dropout
draws from them; the data order never does).

Refused, with one line naming the combination (exit 2): DeepSpeed <-> torch engines; ZeRO-3 <-> ZeRO-1/2 (DeepSpeed
0.19's stage-3 engine looks for the model state in per-rank files a stage-1/2 checkpoint does not have, and the
other way round: measured, both fail inside `load_checkpoint`); another process count for a checkpoint written
before topology.json existed; fp16 across topologies (its dynamic loss scale is not part of a universal checkpoint);
a global batch that the new process count does not divide.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from accelerate.utils import DistributedType, set_seed

from dpo.checkpoint import TOPOLOGY_FILE
from dpo.distributed import to_universal_checkpoint
from dpo.errors import UserError

UNIVERSAL_PREFIX = ".tmp-universal-"  # a staging name: remove_stale_staging cleans what a killed resume left
DEEPSPEED_TAG = "pytorch_model"  # the engine folder Accelerate's save_state writes for the (first) model


@dataclass(frozen=True)
class Topology:
    num_processes: int
    engine: str  # "deepspeed" or "torch" (one process, DDP)
    zero_stage: int  # 0 for torch
    batch_size: int  # pairs per device per micro-step
    gradient_accumulation_steps: int

    @property
    def global_batch(self) -> int:
        return self.num_processes * self.batch_size * self.gradient_accumulation_steps

    def describe(self) -> str:
        engine = f"DeepSpeed ZeRO-{self.zero_stage}" if self.engine == "deepspeed" else "torch (one process or DDP)"
        return f"{engine} on {self.num_processes} process{'es' if self.num_processes > 1 else ''}"


@dataclass(frozen=True)
class RunPlan:
    batch_size: int  # what this run uses per device
    gradient_accumulation_steps: int
    resized: bool  # processes or ZeRO stage differ from the checkpoint's


def engine_of(accelerator: Any) -> tuple[str, int]:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        return "deepspeed", int(config.get("zero_optimization", {}).get("stage", 0))
    return "torch", 0


def current_topology(accelerator: Any, plan: RunPlan) -> Topology:
    engine, stage = engine_of(accelerator)
    return Topology(num_processes=accelerator.num_processes, engine=engine, zero_stage=stage,
                    batch_size=plan.batch_size, gradient_accumulation_steps=plan.gradient_accumulation_steps)


def topology_record(topology: Topology, step: int) -> dict[str, Any]:
    """What `topology.json` holds: the topology and the data position in pairs (step x global batch)."""
    return {**asdict(topology), "global_batch": topology.global_batch, "pairs_seen": step * topology.global_batch}


def read_topology(checkpoint: Path) -> Topology | None:
    """The checkpoint's topology; None for a checkpoint written before topology.json existed."""
    path = Path(checkpoint) / TOPOLOGY_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Topology(num_processes=int(raw["num_processes"]), engine=str(raw["engine"]),
                        zero_stage=int(raw["zero_stage"]), batch_size=int(raw["batch_size"]),
                        gradient_accumulation_steps=int(raw["gradient_accumulation_steps"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a topology record") from None


def share_global_batch(global_batch: int, num_processes: int, *, preferred_batch: int) -> tuple[int, int]:
    """(per-device batch, accumulation) with batch x accumulation x processes == global_batch: the preferred batch
    when it divides the share, else the largest smaller divisor (memory per device never grows). ValueError when
    the processes cannot share the global batch evenly."""
    if global_batch % num_processes:
        raise ValueError(f"a global batch of {global_batch} pairs cannot be shared evenly by {num_processes} "
                         f"processes")
    share = global_batch // num_processes
    batch = max(b for b in range(1, min(preferred_batch, share) + 1) if share % b == 0)
    return batch, share // batch


def plan_run(cfg: Any, accelerator: Any, resume_path: Path | None, *, log: Callable[[str], None]) -> RunPlan:
    """The per-device batch and accumulation of this run (the recipe's, or for a resume whatever keeps the
    checkpoint's global batch on this many processes), applied to the accelerator before `prepare`. Refuses a
    resume across topologies that cannot be done exactly."""
    plan = RunPlan(cfg.batch_size, cfg.gradient_accumulation_steps, resized=False)
    if resume_path is None:
        return plan
    source = read_topology(resume_path)
    engine, stage = engine_of(accelerator)
    world = accelerator.num_processes
    if source is None:  # written by an older version: it resumes only as it was written
        written_by = len(list(Path(resume_path).glob("rng_state_*.json")))
        if written_by and written_by != world:
            raise UserError(f"resume_from_checkpoint: {resume_path.name} was written by {written_by} processes by "
                            f"an older version (no {TOPOLOGY_FILE}), which cannot resume on another number of "
                            f"processes; resume it on {written_by}")
        return plan
    resized = (source.num_processes, source.zero_stage) != (world, stage)
    if source.engine != engine:
        raise UserError(f"resume_from_checkpoint: {resume_path.name} was written by {source.describe()} and this "
                        f"run uses {'DeepSpeed' if engine == 'deepspeed' else 'torch (one process or DDP)'}; their "
                        f"optimizer states do not convert into each other. Resume with a "
                        f"{'DeepSpeed' if source.engine == 'deepspeed' else 'torch (single or ddp)'} accelerate "
                        f"config (any number of processes)")
    if engine == "deepspeed" and (source.zero_stage == 3) != (stage == 3):
        raise UserError(f"resume_from_checkpoint: {resume_path.name} was written by {source.describe()} and this "
                        f"run uses ZeRO-{stage}: DeepSpeed cannot load a universal checkpoint across ZeRO-3 and "
                        f"ZeRO-1/2 (their engines keep the model state in different files). Resume with "
                        f"{'ZeRO-3' if source.zero_stage == 3 else 'ZeRO-1 or ZeRO-2'} (any number of processes)")
    if resized and engine == "deepspeed" and cfg.mixed_precision == "fp16":
        raise UserError(f"resume_from_checkpoint: {resume_path.name} ({source.describe()}) cannot resume on "
                        f"{world} processes / ZeRO-{stage} with fp16: the dynamic loss scale is not carried by a "
                        f"universal checkpoint. Resume as it was written, or train in bf16")
    try:
        batch, accumulation = share_global_batch(source.global_batch, world, preferred_batch=cfg.batch_size)
    except ValueError as exc:
        raise UserError(f"resume_from_checkpoint: {resume_path.name} trained with a global batch of "
                        f"{source.global_batch} ({source.describe()}); {exc}, so the run cannot continue with the "
                        f"same batches. Resume on a number of processes that divides {source.global_batch}") from None
    plan = RunPlan(batch, accumulation, resized=resized)
    if resized:
        log(f"[dpo] resume: {resume_path.name} was written by {source.describe()}; continuing on {world} "
            f"process{'es' if world > 1 else ''}" + (f" with ZeRO-{stage}" if engine == "deepspeed" else ""))
    if (batch, accumulation) != (cfg.batch_size, cfg.gradient_accumulation_steps):
        log(f"[dpo] resume: global batch {source.global_batch} kept as {batch} per device x {accumulation} "
            f"accumulation x {world} processes (the recipe says {cfg.batch_size} x "
            f"{cfg.gradient_accumulation_steps})")
    apply_plan(accelerator, plan)
    return plan


def apply_plan(accelerator: Any, plan: RunPlan) -> None:
    """Give the accelerator (and DeepSpeed's config, read by `prepare`) the plan's batch and accumulation."""
    accelerator.gradient_accumulation_steps = plan.gradient_accumulation_steps
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = plan.batch_size
        if config.get("gradient_accumulation_steps", "auto") != "auto":
            config["gradient_accumulation_steps"] = plan.gradient_accumulation_steps
        if plan.resized:
            config.setdefault("checkpoint", {})["load_universal"] = True


@contextlib.contextmanager
def engine_state(accelerator: Any, resume_path: Path, plan: RunPlan, output_dir: Path, *,
                 torch_load_guard: Callable[[], Any]) -> Iterator[Path]:
    """The folder to load the engine state from: the checkpoint itself, or for a DeepSpeed resize its universal
    conversion (made by the main process in the output dir, which every node sees; removed afterwards)."""
    if not plan.resized or accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield resume_path
        return
    staging = Path(output_dir) / f"{UNIVERSAL_PREFIX}{resume_path.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with torch_load_guard(), contextlib.redirect_stdout(None):  # every file it reads: tensors only
            to_universal_checkpoint(resume_path / DEEPSPEED_TAG, staging / DEEPSPEED_TAG)
    accelerator.wait_for_everyone()
    try:
        yield staging
    finally:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)


def reseed(seed: int, step: int, process_index: int) -> None:
    """After a resize: generators from (seed, step, process index), the same on every repetition of this resume."""
    set_seed(((seed * 1_000_003 + step) * 1_009 + process_index) % 2**32)
