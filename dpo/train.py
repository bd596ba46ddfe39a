"""DPO training: config -> accelerator -> data -> models -> optimizer -> prepare -> loop -> final model.

    python -m dpo.train --config recipes/tiny_full.yaml --model_path M --data_path D --output_dir OUT
    accelerate launch --config_file accelerate_configs/zero3.yaml -m dpo.train --config recipe.yaml

The loss is Eq. 7 of Rafailov et al. (2023) by default, -log σ(β[(log πθ(yw|x) − log πref(yw|x)) −
(log πθ(yl|x) − log πref(yl|x))]); other members of the family are in dpo/losses.py.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from dpo import checkpoint as ckpt
from dpo import resize
from dpo import sequence_parallel as sp
from dpo.atomic import staged_folder
from dpo.attention import resolve_for_run
from dpo.config import TrainConfig, config_to_dict, load_config, save_config
from dpo.config_help import format_help, wants_help
from dpo.contract import check_data_contract
from dpo.data import PreferenceBatch, load_split, optimizer_steps_per_epoch, train_micro_batches
from dpo.distributed import build_accelerator, release_process_groups
from dpo.errors import TrainingDiverged, UserError, run_cli
from dpo.evaluation import eval_plan, eval_summary
from dpo.guard import DivergenceGuard
from dpo.host_memory import return_freed_memory
from dpo.layouts import check_split_rows, choose_run_layout, data_shape
from dpo.listwise_step import (
    check_ranked_run,
    is_ranked,
    make_run_collate,
    ranked_forward_and_loss,
    ranked_layout,
    ranked_summary,
)
from dpo.logprobs import sequence_logps
from dpo.lora import merge_adapter_into_base
from dpo.losses import preference_loss, wants_mean_logps
from dpo.metrics import MetricAccumulator, MetricsWriter, pair_values
from dpo.models import is_peft_model, load_policy
from dpo.objective import answer_logps, loss_kwargs
from dpo.precision import check_quantized_run
from dpo.preemption import PreemptionSignals
from dpo.progress import progress_bar, quiet_library_progress
from dpo.ranked_batch import RankedBatch
from dpo.recipe_data import prepare_recipe_data
from dpo.ref_sync import load_reference, save_reference, sync_reference
from dpo.reference import Reference, build_reference, resolve_reference_kind
from dpo.startup import (
    apply_learning_rate,
    check_inputs,
    check_output_dir,
    check_resume_config,
    clear_previous_run,
    remove_stale_staging,
    resolved_config,
)

__all__ = ["TrainingDiverged", "forward_and_loss", "evaluate", "main", "train"]


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, weighted mean over the micro-batch's pairs, for backward
    pair_metrics: dict[str, torch.Tensor | None]  # [B] per-pair values of dpo.metrics.PAIR_METRICS


def forward_and_loss(policy: torch.nn.Module, reference: Reference, batch: PreferenceBatch, cfg: TrainConfig
                     ) -> StepOutput:
    """Reference log-probs (no grad), one policy forward over chosen and rejected together, then the loss."""
    if isinstance(batch, RankedBatch):  # k scored answers per prompt (dpo/listwise_step.py)
        return ranked_forward_and_loss(policy, reference, batch, cfg)  # type: ignore[return-value]
    ref_chosen, ref_rejected = reference.logps(batch)
    # Some losses want per-token means (SimPO's reward is length-normalised by definition, Meng et al. 2024, Eq. 4).
    average = cfg.average_log_prob or wants_mean_logps(cfg.loss_type)
    policy_out = sequence_logps(policy, batch, average=average, chunk_size=cfg.logits_chunk_size,
                                with_log_sum_sq=cfg.use_weighting)
    policy_chosen, policy_rejected = answer_logps(policy_out, ld_alpha=cfg.ld_alpha)
    out = preference_loss(cfg.loss_type, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                          **loss_kwargs(cfg, policy_out, batch.pair_weight))
    weight = batch.pair_weight
    # A weighted mean over the real pairs: every pair counts once, so micro-batch x accumulation is invariant.
    loss = (out.losses * weight).sum() / weight.sum().clamp(min=1.0)
    pair_metrics = pair_values(
        losses=out.losses, chosen_rewards=out.chosen_rewards, rejected_rewards=out.rejected_rewards,
        policy_chosen_logps=policy_chosen, policy_rejected_logps=policy_rejected, ref_chosen_logps=ref_chosen,
    )
    if len(out.components) > 1:  # a mix: each component too, before its weight
        pair_metrics.update({f"loss/{name}": value for name, value in out.components.items()})
    return StepOutput(loss=loss, pair_metrics=pair_metrics)


@torch.no_grad()
def evaluate(policy: torch.nn.Module, reference: Reference, dataset: Any, collate: Any, cfg: TrainConfig,
             accelerator: Any, *, step: int | None = None, log: Callable[[str], None] | None = None,
             sequence_group: sp.SequenceGroup | None = None) -> dict[str, float]:
    """Loss, rewards, both preference accuracies and log-ratio over the eval pairs (all, or eval_max_pairs' fixed
    subset) exactly once, all processes, in the run's layout (`collate`) and batches of `dpo.evaluation`; a
    progress bar on the main process; `runtime` (s) and `pairs_per_second` too, and one line to `log`."""
    started = time.perf_counter()
    data_world, data_rank = sp.data_parallel(sequence_group, num_processes=accelerator.num_processes,
                                             process_index=accelerator.process_index)
    plan = eval_plan(dataset, cfg, num_processes=data_world, process_index=data_rank)
    policy.eval()
    acc = MetricAccumulator(accelerator.device)
    progress = progress_bar(total=plan.num_pairs, initial=0, enabled=accelerator.is_main_process, desc="eval")
    try:
        for (indices, weights), pairs in zip(plan.batches, plan.global_pairs):
            batch = collate([dataset[i] for i in indices], weights).to(accelerator.device)
            try:
                out = forward_and_loss(policy, reference, batch, cfg)
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in torch >= 2.5, the same class
                raise UserError(f"evaluation: a batch of {plan.batch_size} eval pairs does not fit in device memory "
                                f"(the longest pairs come first); set --eval_batch_size "
                                f"{max(1, plan.batch_size // 2)}") from None
            acc.add(out.pair_metrics, *sp.counted(batch))
            progress.update(pairs)
    finally:
        progress.close()
        policy.train()
    metrics = acc.reduce(accelerator)
    metrics.pop("num_tokens")
    metrics["runtime"] = time.perf_counter() - started
    metrics["pairs_per_second"] = metrics["num_pairs"] / max(metrics["runtime"], 1e-9)
    if log is not None:
        log(eval_summary(step, metrics))
    return metrics


def show_step(progress: Any, metrics: dict[str, float]) -> None:
    """Advance the bar by the step just taken, showing that step's loss and accuracy: the postfix is set before
    `update`, which is what redraws (after it, a redraw would show the step before)."""
    # refresh=False: the redraw waits for the bar's interval (dpo/progress.py) instead of every step.
    progress.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}", refresh=False)
    progress.update(1)


def build_optimizer(policy: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in policy.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim == "rmsprop":  # TrainingArguments' rmsprop: torch's RMSprop at its defaults but the learning rate
        return torch.optim.RMSprop([g for g in groups if g["params"]], lr=cfg.learning_rate)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def scheduler_name(cfg: TrainConfig) -> str:
    if cfg.lr_scheduler == "cosine" and cfg.min_lr_rate:
        return "cosine_with_min_lr"
    return {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)


def interval_steps(every: int | float | str, total_steps: int, steps_per_epoch: int) -> int:
    """Steps between two events: `every` itself; for a share of the run (a float below 1) that share of the total,
    rounded up (TrainingArguments' rule); for "epoch" the optimizer steps of one epoch."""
    if every == "epoch":
        return steps_per_epoch
    return math.ceil(every * total_steps) if isinstance(every, float) else int(every)


def total_optimizer_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * steps_per_epoch))


def save_final(accelerator: Any, policy: torch.nn.Module, tokenizer: Any, cfg: TrainConfig) -> None:
    """final/: the full model (safetensors) or, with LoRA, the adapter; final_merged/ with --merge_lora."""
    unwrapped = accelerator.unwrap_model(policy)
    state_dict = accelerator.get_state_dict(policy)  # gathers ZeRO-3 shards into 16-bit weights on the main process
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        with staged_folder(out / "final") as tmp, ckpt.reporting_full_disk(tmp):
            unwrapped.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            if cfg.lora and cfg.lora_adapter_path:
                # This adapter sits on base + SFT adapter; peft's adapter_config only names the bare base, so
                # record the real base beside it (PeftModel.from_pretrained(bare base, final/) is another model).
                (tmp / "dpo_base.json").write_text(json.dumps({
                    "model_path": cfg.model_path, "merged_sft_adapter": cfg.lora_adapter_path,
                    "load_with": "dpo.lora.load_trained_adapter(cfg, 'final') or --merge_lora (final_merged/)"},
                    indent=2))
        if cfg.lora and cfg.merge_lora:
            merge_adapter_into_base(cfg, out / "final", out / "final_merged", tokenizer)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    """Exit 0; 2 with one line for a user error (bad config, path, checkpoint, layout, full disk); 3 when it
    diverged; 75 when it stopped on a signal of `save_on_signal` after saving a checkpoint (requeue and resume)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_help(argv):
        print(format_help("python -m dpo.train", __doc__.split("\n\n")[0]), end="")
        return 0
    return run_cli("dpo.train", lambda: train(load_config(argv)))


def validate_startup(cfg: TrainConfig, log: Any) -> Path | None:
    """Everything checked before a run writes anything: inputs, output folder, and for a resume the checkpoint
    (verified) and its config (the same run). Returns the checkpoint to resume from."""
    check_inputs(cfg)
    check_output_dir(cfg)
    if not cfg.resume_from_checkpoint:
        return None
    path = ckpt.resolve_resume_path(cfg.output_dir, cfg.resume_from_checkpoint, log=log)
    check_resume_config(ckpt.read_run_config(path), cfg, log=log)
    return path


def train(cfg: TrainConfig) -> dict[str, Any]:  # noqa: C901 - the training flow, read top to bottom
    return_freed_memory()  # peak RSS follows live tensors (dpo/host_memory.py)
    quiet_library_progress()  # in a log file: no loading/saving bars from transformers and datasets
    # ---- accelerator, seed, output dir
    accelerator = build_accelerator(mixed_precision=cfg.mixed_precision,
                                    gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                                    max_grad_norm=cfg.max_grad_norm, batch_size=cfg.batch_size)
    check_quantized_run(cfg, accelerator)
    set_seed(cfg.seed)
    out_dir = Path(cfg.output_dir)
    log = print if accelerator.is_main_process else (lambda *a, **k: None)
    # The attention kernel this machine and model can run, or a one-line refusal (dpo/attention.py).
    cfg = resolve_for_run(sp.splittable_request(cfg), device_type=accelerator.device.type, needs_backward=True)
    cfg = prepare_recipe_data(cfg, accelerator, log)  # raw data named by the recipe: prepared once, cached
    resume_path = validate_startup(cfg, log)  # nothing is written to out_dir before this passes
    sp.check_models(cfg, num_processes=accelerator.num_processes)  # refusals of --sequence_parallel_size
    # The recipe's batch, or on a resume whatever keeps the checkpoint's global batch on this many processes.
    plan = resize.plan_run(cfg, accelerator, resume_path, log=log)
    batch_size, accumulation = plan.batch_size, plan.gradient_accumulation_steps
    if plan.resized and cfg.sequence_parallel_size > 1:
        raise UserError(f"resume_from_checkpoint: sequence_parallel_size {cfg.sequence_parallel_size} with a resume on "
                        f"another number of processes or ZeRO stage is not supported yet; resume as it was written")
    sequence_group = sp.setup(cfg.sequence_parallel_size)  # None at 1: every process has rows of its own

    # ---- data: the prepared tokenizer must be the model's own (final/ ships the model's)
    train_ds = load_split(cfg.data_path, "train")
    eval_ds = load_split(cfg.data_path, "eval")
    if cfg.eval_on_start and eval_ds is None:
        raise UserError(f"eval_on_start: {cfg.data_path} has no eval split (data_prep --eval_fraction or --eval_input "
                        f"makes one)")
    data = check_data_contract(cfg, {"train": train_ds, "eval": eval_ds}, log=log)  # against prep_report.json
    eval_ds = eval_ds if cfg.do_eval else None  # checked with the rest of the data, not evaluated
    if is_ranked(cfg, train_ds, eval_ds):  # k scored answers per prompt: one record is one prompt
        check_ranked_run(cfg)
        log(ranked_summary(cfg, train_ds, eval_ds))
    tokenizer = data.tokenizer  # the model's own; the contract checked its special ids equal the data's
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # The data-parallel degree: the ranks of a sequence-parallel group read the same pairs.
    world, data_rank = sp.data_parallel(sequence_group, num_processes=accelerator.num_processes,
                                        process_index=accelerator.process_index)
    steps_per_epoch = optimizer_steps_per_epoch(len(train_ds), batch_size=batch_size, num_processes=world,
                                                accumulation=accumulation)
    global_batch = batch_size * accumulation * world
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_ds)} training pairs cannot fill one global batch of {global_batch} "
                        f"(batch_size {batch_size} x accumulation {accumulation} x "
                        f"{world} processes); lower batch_size or gradient_accumulation_steps")
    total_steps = total_optimizer_steps(cfg, steps_per_epoch)
    # Intervals given as a share of the run (TrainingArguments' floats below 1) become step counts.
    log_every, eval_every, save_every = (interval_steps(v, total_steps, steps_per_epoch)
                                         for v in (cfg.logging_steps, cfg.eval_steps, cfg.save_steps))
    left_out = len(train_ds) - steps_per_epoch * global_batch
    log(f"[dpo] {len(train_ds)} train pairs, {len(eval_ds) if eval_ds else 0} eval pairs; global batch "
        f"{global_batch} = {batch_size} per device x {accumulation} accumulation x {world} "
        f"{'processes' if sequence_group is None else 'sequence-parallel groups'}; {steps_per_epoch} steps per "
        f"epoch, {total_steps} steps")
    if left_out:
        log(f"[dpo] each epoch leaves out {left_out} pairs that do not fill a whole global batch "
            f"(a different {left_out} each epoch: the order is reshuffled)")

    # ---- models: the policy, then the reference (one decision, in dpo/reference.py)
    ref_kind = resolve_reference_kind(cfg, data, log=log)
    log(f"[dpo] reference: {ref_kind}")
    policy = load_policy(cfg)
    policy.train()
    optimizer = build_optimizer(policy, cfg)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(scheduler_name(cfg), optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                              scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_rate} if cfg.min_lr_rate else None)
    # The scheduler is stepped once per optimizer step by this loop (Accelerate's wrapper would step it once per
    # process); checkpoints carry its state as JSON (dpo/checkpoint.py), never as a pickle.
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped_policy = accelerator.unwrap_model(policy)
    reference = build_reference(ref_kind, cfg, accelerator, policy=policy, unwrapped_policy=unwrapped_policy)

    # ---- layout: the fastest one that a probe of these very models proves exact (dpo/layouts.py)
    probed = [policy] + ([reference.model] if reference.model is not None else [])
    shape = data_shape(train_ds, eval_ds)
    choice = choose_run_layout(probed, cfg, accelerator, pad_token_id=pad_id, data=shape)
    # k answers per prompt: the chosen layout is checked on rows of k answers too (dpo/ranked_probe.py).
    choice = ranked_layout(probed, choice, cfg, accelerator, pad_token_id=pad_id, datasets_=(train_ds, eval_ds),
                           longest=shape.longest)
    log(choice.message)
    collate = make_run_collate(choice, cfg, pad_token_id=pad_id, datasets_=(train_ds, eval_ds))
    if sequence_group is not None:  # after the layout probe (whole rows); split rows checked against them
        log(check_split_rows(probed, choice, cfg, accelerator, group=sequence_group, pad_token_id=pad_id))
        collate = sp.splitting(collate, sequence_group, choice.attention, mask_form=choice.mask_form)
    if accelerator.is_main_process:
        # ZeRO-3 leaves an empty placeholder in each partitioned parameter; ds_numel is its full size.
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in unwrapped_policy.parameters() if p.requires_grad)
        log(f"[dpo] trainable parameters: {n_train:,}" + (" (LoRA)" if is_peft_model(unwrapped_policy) else ""))

    # ---- outputs (inputs are valid by now), resume
    guard = DivergenceGuard([p for p in unwrapped_policy.parameters() if p.requires_grad], accelerator, log=log)
    state = ckpt.TrainerState()
    if resume_path:
        with resize.engine_state(accelerator, resume_path, plan, out_dir,
                                 torch_load_guard=lambda: ckpt.checkpoint_torch_load(accelerator)) as engine_dir:
            state = ckpt.load_checkpoint(accelerator, resume_path, scheduler=scheduler, engine_state_dir=engine_dir,
                                         restore_rng=not plan.resized)
        if plan.resized:
            resize.reseed(cfg.seed, state.step, accelerator.process_index)
        if cfg.sync_ref_model:  # TR-DPO: the reference has moved with the policy; restore it as saved
            load_reference(reference.model, resume_path, accelerator)
        if scheduler.base_lrs[0] != cfg.learning_rate:  # allowed by --resume_allow_changes
            apply_learning_rate(scheduler, optimizer, cfg.learning_rate)
    if accelerator.is_main_process:
        if cfg.overwrite_output_dir:
            clear_previous_run(out_dir, log=log)
        remove_stale_staging(out_dir, log=log)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    accelerator.wait_for_everyone()
    writer = MetricsWriter(out_dir, enabled=accelerator.is_main_process, use_wandb=cfg.use_wandb,
                           run_name=cfg.run_name, wandb_project=cfg.wandb_project, config=config_to_dict(cfg))
    if resume_path:
        writer.truncate_after(state.step)
        log(f"[dpo] resumed from {resume_path} at step {state.step}")

    last_eval: dict[str, float] = {}
    if cfg.eval_on_start and state.step == 0:  # the starting model: the "before" of every eval curve
        last_eval = evaluate(policy, reference, eval_ds, collate, cfg, accelerator, step=0, log=log,
                             sequence_group=sequence_group)
        writer.write(0, "eval", last_eval)
        update_early_stopping(state, last_eval, cfg, log)  # the baseline a later evaluation must improve on
    elif cfg.eval_on_start:  # a resumed run's weights are not the starting model's; its step 0 is already logged
        log(f"[dpo] eval_on_start: no step-0 evaluation when resuming at step {state.step}")

    # ---- the loop
    topology = resize.current_topology(accelerator, plan)

    def save(state: ckpt.TrainerState) -> None:
        ckpt.save_checkpoint(accelerator, out_dir, state, scheduler=scheduler, run_config=resolved_config(cfg),
                             save_total_limit=cfg.save_total_limit,
                             topology=resize.topology_record(topology, state.step),
                             save_extra=(lambda folder: save_reference(reference.model, folder, accelerator))
                             if cfg.sync_ref_model else None)

    # From here a signal of save_on_signal stops the run at the next step boundary, with a checkpoint.
    stop = PreemptionSignals(cfg.save_on_signal)
    accumulator = MetricAccumulator(accelerator.device)
    # Redirected to a log file (clusters, CI): a plain line at most every 30 s, no carriage-return redraws.
    progress = progress_bar(total=total_steps, initial=state.step, enabled=accelerator.is_main_process)
    step_start = time.perf_counter()
    while state.step < total_steps and not state.stopped_early:
        epoch = state.step // steps_per_epoch
        micro_batches = train_micro_batches(
            len(train_ds), batch_size=batch_size, num_processes=world, process_index=data_rank,
            accumulation=accumulation, seed=cfg.seed, epoch=epoch)
        # A resumed run skips the micro-batches of this epoch that its checkpoint's steps already trained on.
        trained_micro_batches = (state.step % steps_per_epoch) * accumulation
        for indices in micro_batches[trained_micro_batches:]:
            batch = collate([train_ds[i] for i in indices], None).to(accelerator.device)
            with accelerator.accumulate(policy):  # no gradient all-reduce until the step's last micro-batch
                out = forward_and_loss(policy, reference, batch, cfg)
                accelerator.backward(out.loss)
            accumulator.add(out.pair_metrics, *sp.counted(batch))  # each pair once per sequence group
            if not accelerator.sync_gradients:
                continue
            step_metrics = optimizer_step(policy, optimizer, scheduler, accelerator, accumulator, guard, cfg,
                                          step=state.step + 1)
            state.step += 1
            if cfg.sync_ref_model and state.step % cfg.ref_model_sync_steps == 0:  # TR-DPO, after the step
                sync_reference(unwrapped_policy, reference.model, alpha=cfg.ref_model_mixup_alpha)
            elapsed = time.perf_counter() - step_start  # the step's own time: evaluations and saves come after
            step_metrics["tokens_per_second"] = step_metrics.pop("num_tokens") / max(elapsed, 1e-9)
            step_metrics["epoch"] = state.step / steps_per_epoch
            show_step(progress, step_metrics)
            if state.step % log_every == 0 or state.step == total_steps:
                writer.write(state.step, "train", step_metrics)
            if eval_ds is not None and ((eval_every and state.step % eval_every == 0)
                                        or state.step == total_steps):
                last_eval = evaluate(policy, reference, eval_ds, collate, cfg, accelerator, step=state.step, log=log,
                                     sequence_group=sequence_group)
                writer.write(state.step, "eval", last_eval)
                update_early_stopping(state, last_eval, cfg, log)
            saved = save_every and state.step % save_every == 0 and state.step < total_steps
            if saved:
                save(state)
            if state.step < total_steps and not state.stopped_early and stop.agreed(accelerator):
                if not saved:
                    save(state)
                progress.close()
                writer.close()
                # Together: the elastic agent answers the first rank's exit by stopping the others with SIGTERM,
                # which must not land in the main process's last log writes.
                accelerator.wait_for_everyone()
                raise stop.preempted(step=state.step, total_steps=total_steps, output_dir=out_dir)
            step_start = time.perf_counter()
            if state.step >= total_steps or state.stopped_early:
                break
    progress.close()

    # ---- final model (a signal now is only recorded: the run finishes)
    save_final(accelerator, policy, tokenizer, cfg)
    writer.close()
    stop.restore()
    log(f"[dpo] done at step {state.step}; final model in {out_dir / 'final'}")
    return {"step": state.step, "eval": last_eval, "stopped_early": state.stopped_early}


def optimizer_step(policy: torch.nn.Module, optimizer: Any, scheduler: Any, accelerator: Any,
                   accumulator: MetricAccumulator, guard: DivergenceGuard, cfg: TrainConfig, *, step: int
                   ) -> dict[str, float]:
    """Step `step` once its micro-batches' gradients are in: clip, check for divergence, update the weights and
    the learning rate. Returns the step's metrics (reduced over micro-batches and processes), its learning rate and
    gradient norm. `accelerator.sync_gradients` was set by the last `accumulate()`."""
    norm = accelerator.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm or float("inf"))
    grad_norm = math.nan if norm is None else float(norm)  # NaN in the log: not reported
    learning_rate = scheduler.get_last_lr()[0]  # the rate this update uses
    metrics = accumulator.reduce(accelerator)
    guard.check_step(step, metrics["loss"], None if norm is None else grad_norm,
                     not_applied=step_not_applied(accelerator))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    guard.check_weights(step)  # before anything of this step can be saved
    metrics["learning_rate"] = learning_rate
    metrics["grad_norm"] = grad_norm
    return metrics


def step_not_applied(accelerator: Any) -> str:
    """What became of the diverged step: DeepSpeed runs its optimizer step inside backward, before this check."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "DeepSpeed had already applied this step, so the weights in memory are suspect"
    return "the optimizer step was not taken"


def update_early_stopping(state: ckpt.TrainerState, metrics: dict[str, float], cfg: TrainConfig, log: Any) -> None:
    """Track the best eval loss; stop after `early_stopping_patience` evaluations without an improvement of more
    than `early_stopping_min_delta`. Also warns when |logratio/chosen| exceeds `max_logratio`."""
    logratio = metrics.get("logratio/chosen", math.nan)
    if cfg.max_logratio is not None and math.isfinite(logratio) and abs(logratio) > cfg.max_logratio:
        log(f"[dpo] warning: eval logratio/chosen {logratio:.4f} is beyond ±max_logratio {cfg.max_logratio} at step "
            f"{state.step}: the policy is drifting from the reference (lower the learning rate or raise beta)")
    loss = metrics["loss"]
    if state.best_eval_loss is None or loss < state.best_eval_loss - cfg.early_stopping_min_delta:
        state.best_eval_loss = loss
        state.evals_without_improvement = 0
    else:
        state.evals_without_improvement += 1
    if cfg.early_stopping_patience is not None and state.evals_without_improvement >= cfg.early_stopping_patience:
        state.stopped_early = True
        log(f"[dpo] early stopping at step {state.step}: eval loss has not improved by more than "
            f"{cfg.early_stopping_min_delta} for {state.evals_without_improvement} evaluations "
            f"(best {state.best_eval_loss:.4f})")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    code = main()
    release_process_groups(code)
    sys.exit(code)
