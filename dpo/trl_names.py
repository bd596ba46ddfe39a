"""TRL's and alignment-handbook's setting names, read as this project's own: a TRL recipe runs as it is.

    ours, ignored, refused = translate(recipe_dict, source="recipe.yaml")

Every name of `trl.DPOConfig` (with `transformers.TrainingArguments`), `trl.ModelConfig` and `trl.ScriptArguments`,
and alignment-handbook's data keys, is exactly one of:
- our own field of the same name and meaning (`beta`, `learning_rate`, `seed`, ...): passed through;
- an alias (`ALIASES`): converted to our fields with the same meaning (`per_device_train_batch_size` ->
  `batch_size`, `bf16: true` -> `mixed_precision: bf16`, ...);
- ignored (`IGNORED`): no effect here whatever its value (Hub uploads, log verbosity, data-loader workers); listed
  in one warning line at start, never silently dropped;
- refused unless its value is what this project does anyway (`REFUSED`): a value it cannot honour is a one-line
  error (exit 2) naming the key and what to do.
A name that is one of our fields (`attn_implementation`, `eval_on_start` ...) takes its own meaning before any entry
here. The README's "Coming from TRL" table is
`markdown_table()` (tests/test_trl_names.py keeps it in step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

# (value, the whole source mapping it came from) -> our fields; None: no effect here (listed as ignored).
Converter = Callable[[Any, Mapping[str, Any]], "dict[str, Any] | None"]


class Refusal(Exception):
    """A TRL value this project cannot honour; the message says why and what to do instead."""


@dataclass(frozen=True)
class Alias:
    ours: str  # our field(s) it sets, for the README table
    convert: Converter
    example: tuple[Any, dict[str, Any]]  # a TRL value and the our-field values it must parse to (tested)
    note: str = ""  # what differs, for the README table
    flag: bool = False  # a boolean: a bare `--name` on the command line means true


def _rename(field: str) -> Converter:
    return lambda value, _src: {field: value}


def _dtype(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
    names = {None: "auto", "auto": "auto", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16", "fp16": "fp16",
             "half": "fp16", "float32": "fp32", "fp32": "fp32", "float": "fp32"}
    if value not in names:
        raise Refusal(f"{value!r} is not a dtype this project loads (bfloat16, float16, float32, auto)")
    return {"torch_dtype": names[value]}


def _precision(mine: str, other: str) -> Converter:
    def convert(value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
        if value is True and src.get(other) is True:
            raise Refusal("bf16 and fp16 are both true: choose one")
        if value is True:
            return {"mixed_precision": mine}
        return {} if src.get(other) is True else {"mixed_precision": "no"}
    return convert


_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant_with_warmup": "constant",
               "cosine_with_min_lr": "cosine"}


def _scheduler(value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
    if value == "constant":  # TRL's plain constant has no warm-up; ours is constant after the warm-up
        if src.get("warmup_ratio") or src.get("warmup_steps"):
            raise Refusal("'constant' ignores the warm-up in TRL; use constant_with_warmup, or drop the warm-up")
        return {"lr_scheduler": "constant"}
    if value not in _SCHEDULERS:
        raise Refusal(f"{value!r} is not available; use linear, cosine, cosine_with_min_lr or constant_with_warmup")
    if value == "cosine_with_min_lr" and not {"min_lr_rate", "min_lr"} & set(src.get("lr_scheduler_kwargs") or {}):
        raise Refusal("cosine_with_min_lr needs lr_scheduler_kwargs with min_lr_rate (or min_lr)")
    return {"lr_scheduler": _SCHEDULERS[value]}


def _scheduler_kwargs(value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(value or {})
    if kwargs.pop("num_cycles", 0.5) != 0.5:
        raise Refusal("num_cycles other than 0.5 (one half-cosine) is not available")
    out: dict[str, Any] = {}
    if "min_lr_rate" in kwargs:
        out["min_lr_rate"] = float(kwargs.pop("min_lr_rate"))
    elif "min_lr" in kwargs:
        if "learning_rate" not in src:
            raise Refusal("min_lr needs learning_rate in the same recipe (or give min_lr_rate)")
        out["min_lr_rate"] = float(kwargs.pop("min_lr")) / float(src["learning_rate"])
    if out and src.get("lr_scheduler_type", "cosine_with_min_lr") != "cosine_with_min_lr":
        raise Refusal("min_lr_rate/min_lr apply to lr_scheduler_type cosine_with_min_lr")
    if kwargs:
        raise Refusal(f"{', '.join(sorted(kwargs))}: not available (min_lr_rate, min_lr, num_cycles 0.5 are)")
    return out


def _strategy(kind: str) -> Converter:
    """eval_strategy / save_strategy: steps (at *_steps, TrainingArguments' default 500), epoch or no."""
    def convert(value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
        if value not in ("steps", "epoch", "no"):
            raise Refusal(f"{value!r} is not available: use steps, epoch or no")
        if kind == "save":
            return {"save_steps": {"steps": src.get("save_steps", 500), "epoch": "epoch", "no": 0}[value]}
        if value == "epoch":
            return {"eval_steps": "epoch", "do_eval": True}
        if value == "no":  # alignment-handbook still evaluates once at the end when do_eval is true
            return {"eval_steps": 0, "do_eval": bool(src.get("do_eval", False))}
        return {"eval_steps": src.get("eval_steps", src.get("logging_steps", 500)), "do_eval": True}
    return convert


def _unless_strategy(field: str, strategy: str) -> Converter:
    """eval_steps / save_steps / do_eval: decided by the strategy key when the same source has one."""
    return lambda value, src: {} if strategy in src else {field: value}


def _logging_strategy(value: Any, _src: Mapping[str, Any]) -> dict[str, Any] | None:
    if value == "steps":
        return {}
    if value == "epoch":
        return {"logging_steps": "epoch"}
    if value == "no":
        return None  # metrics are still written every logging_steps
    raise Refusal(f"{value!r} is not available: use steps, epoch or no")


def _report_to(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
    items = [value] if isinstance(value, str) else list(value or [])
    unknown = [item for item in items if item not in ("tensorboard", "wandb", "none", "all")]
    if unknown:
        raise Refusal(f"{', '.join(map(str, unknown))}: only tensorboard (always written) and wandb are available")
    return {"use_wandb": "wandb" in items or "all" in items}


def _target_modules(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
    if value in (None, "all-linear"):  # ours: every linear layer but the LM head, as peft's all-linear
        return {"lora_target_modules": None}
    if isinstance(value, str):  # "q_proj,v_proj" from the command line
        return {"lora_target_modules": [name.strip() for name in value.split(",") if name.strip()]}
    return {"lora_target_modules": list(value)}


def _optim(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
    if value in ADAMW_NAMES:
        return {"optim": "adamw"}
    if value == "rmsprop":
        return {"optim": "rmsprop"}
    raise Refusal(f"{value!r} is not available: the AdamW variants ({', '.join(sorted(ADAMW_NAMES))}) or rmsprop")


def _warmup_steps(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(value, float) and 0 < value < 1:  # TrainingArguments 5: a float below 1 is a ratio
        return {"warmup_ratio": value}
    return {"warmup_steps": value}


def _resume(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
    return {"resume_from_checkpoint": {True: "latest", False: None}.get(value, value) if isinstance(value, bool)
            else value}


def _gc_kwargs(value: Any, _src: Mapping[str, Any]) -> dict[str, Any] | None:
    kwargs = dict(value or {})
    reentrant = kwargs.pop("use_reentrant", False)
    if kwargs:
        raise Refusal(f"{', '.join(sorted(kwargs))}: not available (only use_reentrant)")
    return {} if reentrant is False else None  # non-reentrant checkpointing always: the same gradients


def _flag(field: str, *, when_true: Any, when_false: Any = dataclasses.MISSING) -> Converter:
    def convert(value: Any, _src: Mapping[str, Any]) -> dict[str, Any]:
        if value is True:
            return {field: when_true}
        return {} if when_false is dataclasses.MISSING else {field: when_false}
    return convert


def _optional_ignored(value: Any, _src: Mapping[str, Any]) -> dict[str, Any] | None:
    return {} if not value else None


# --- data keys: alignment-handbook's `dataset_mixer`/`dataset_splits`, TRL's `dataset_name` family


def _mixer(value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
    """The older alignment-handbook form: {id: weight} and splits; '*train*' splits are mixed by weight, '*test*'
    splits are held out whole (alignment-handbook's get_datasets)."""
    if not isinstance(value, Mapping) or not value:
        raise Refusal("expected a mapping of dataset id to weight")
    splits = src.get("dataset_splits") or ["train", "test"]
    train = [{"id": name, "split": s, "weight": w} for name, w in value.items() for s in splits if "train" in s]
    held = [{"id": name, "split": s} for name in value for s in splits if "test" in s]
    if not train:
        raise Refusal(f"dataset_splits {splits} names no split with 'train' in its name")
    mixture: dict[str, Any] = {"datasets": train}
    if held:
        mixture["eval_datasets"] = held
    return {"dataset_mixture": mixture}


def _dataset_name(value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
    source = {"id": value, "split": src.get("dataset_train_split", "train")}
    if src.get("dataset_config") is not None:
        source["config"] = src["dataset_config"]
    mixture: dict[str, Any] = {"datasets": [source]}
    test_split = src.get("dataset_test_split")
    if test_split is None and src.get("eval_strategy", "no") != "no":
        test_split = "test"  # TRL's default, used by its scripts when it evaluates
    if test_split is not None:
        mixture["eval_datasets"] = [{**source, "split": test_split}]
    return {"dataset_mixture": mixture}


def _needs(owner: str) -> Converter:
    def convert(_value: Any, src: Mapping[str, Any]) -> dict[str, Any]:
        if owner not in src and not (owner == "dataset_name" and "dataset" in src):
            raise Refusal(f"needs {owner} in the same recipe")
        return {}
    return convert


ADAMW_NAMES = frozenset({"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw_torch_xla",
                         "adamw_torch_npu_fused", "paged_adamw_32bit", "adamw"})

ALIASES: dict[str, Alias] = {
    "model_name_or_path": Alias("model_path", _rename("model_path"), ("sft/", {"model_path": "sft/"}),
                                "a local folder; nothing is downloaded"),
    "per_device_train_batch_size": Alias("batch_size", _rename("batch_size"), (8, {"batch_size": 8})),
    "per_device_eval_batch_size": Alias("eval_batch_size", _rename("eval_batch_size"), (4, {"eval_batch_size": 4})),
    "num_train_epochs": Alias("num_epochs", _rename("num_epochs"), (2, {"num_epochs": 2.0})),
    "torch_dtype": Alias("torch_dtype", _dtype, ("bfloat16", {"torch_dtype": "bf16"}),
                         "the frozen weights' dtype (reference, LoRA base); trained weights stay fp32 under autocast"),
    "dtype": Alias("torch_dtype", _dtype, ("float16", {"torch_dtype": "fp16"}), "as torch_dtype"),
    "bf16": Alias("mixed_precision", _precision("bf16", "fp16"), (True, {"mixed_precision": "bf16"}), flag=True),
    "fp16": Alias("mixed_precision", _precision("fp16", "bf16"), (True, {"mixed_precision": "fp16"}), flag=True),
    "lr_scheduler_type": Alias("lr_scheduler", _scheduler, ("constant_with_warmup", {"lr_scheduler": "constant"}),
                               "linear, cosine, cosine_with_min_lr, constant_with_warmup; constant without warm-up"),
    "lr_scheduler_kwargs": Alias("min_lr_rate", _scheduler_kwargs, ({"min_lr_rate": 0.1}, {"min_lr_rate": 0.1}),
                                 "min_lr_rate or min_lr (with cosine_with_min_lr); num_cycles 0.5"),
    "warmup_steps": Alias("warmup_steps, warmup_ratio", _warmup_steps, (0.25, {"warmup_ratio": 0.25}),
                          "a float below 1 is a ratio (TrainingArguments 5)"),
    "eval_strategy": Alias("eval_steps, do_eval", _strategy("eval"), ("no", {"eval_steps": 0, "do_eval": False}),
                           "steps, epoch or no; no + do_eval: true evaluates once at the end"),
    "eval_steps": Alias("eval_steps", _unless_strategy("eval_steps", "eval_strategy"), (7, {"eval_steps": 7}),
                        "a float below 1 is a fraction of the run's steps"),
    "do_eval": Alias("do_eval", _unless_strategy("do_eval", "eval_strategy"), (False, {"do_eval": False}),
                     flag=True),
    "save_strategy": Alias("save_steps", _strategy("save"), ("no", {"save_steps": 0}),
                           "steps, epoch or no ('best' is refused: final/ is the last step's model)"),
    "save_steps": Alias("save_steps", _unless_strategy("save_steps", "save_strategy"), (0.5, {"save_steps": 0.5}),
                        "a float below 1 is a fraction of the run's steps"),
    "logging_strategy": Alias("logging_steps", _logging_strategy, ("steps", {}),
                              "steps or epoch; 'no' is ignored (metrics are written every logging_steps)"),
    "report_to": Alias("use_wandb", _report_to, (["tensorboard", "wandb"], {"use_wandb": True}),
                       "TensorBoard is always written"),
    "use_peft": Alias("lora", _rename("lora"), (True, {"lora": True}), flag=True),
    "lora_target_modules": Alias("lora_target_modules", _target_modules, ("all-linear", {"lora_target_modules": None}),
                                 "all-linear: every linear layer but the LM head"),
    "precompute_ref_log_probs": Alias("reference", _flag("reference", when_true="precomputed"),
                                      (True, {"reference": "precomputed"}),
                                      "run python -m dpo.precompute_ref on the prepared data first", flag=True),
    "padding_free": Alias("layout", _flag("layout", when_true="packed"), (True, {"layout": "packed"}),
                          "false keeps the automatic choice (every layout gives the same log-probs)", flag=True),
    "optim": Alias("optim", _optim, ("paged_adamw_32bit", {"optim": "adamw"}),
                   "AdamW variants are torch's AdamW (32-bit state, not paged); rmsprop; anything else refused"),
    "do_train": Alias("(this command trains)", lambda value, _src: {} if value else None, (True, {}),
                      "false is ignored (listed): this command trains", flag=True),
    "resume_from_checkpoint": Alias("resume_from_checkpoint", _resume, (True, {"resume_from_checkpoint": "latest"})),
    "gradient_checkpointing_kwargs": Alias("gradient_checkpointing", _gc_kwargs, ({"use_reentrant": False}, {}),
                                           "always non-reentrant (use_reentrant: true is ignored: same gradients)"),
    "dataset_mixer": Alias("dataset_mixture", _mixer,
                           ({"d/": 0.5}, {"dataset_mixture": {"datasets": [{"id": "d/", "split": "train",
                                                                            "weight": 0.5}],
                                                              "eval_datasets": [{"id": "d/", "split": "test"}]}}),
                           "with dataset_splits: '*train*' splits mixed by weight, '*test*' splits held out"),
    "dataset_splits": Alias("dataset_mixture", _needs("dataset_mixer"),
                            (["train_prefs"], {"dataset_mixture": {"datasets": [{"id": "d/", "split": "train_prefs",
                                                                                 "weight": 1.0}]}}),
                            "read with dataset_mixer (the example's: {d/: 1.0})"),
    "dataset_name": Alias("dataset_mixture", _dataset_name,
                          ("d/", {"dataset_mixture": {"datasets": [{"id": "d/", "split": "train"}]}}),
                          "any input data_prep --input takes"),
    "dataset": Alias("dataset_mixture", _dataset_name,
                     ("d/", {"dataset_mixture": {"datasets": [{"id": "d/", "split": "train"}]}}), "as dataset_name"),
    "dataset_config": Alias("dataset_mixture", _needs("dataset_name"),
                            ("c", {"dataset_mixture": {"datasets": [{"id": "d/", "split": "train", "config": "c"}]}}),
                            "read with dataset_name (the example's: d/); a sub-folder of a local copy"),
    "dataset_train_split": Alias("dataset_mixture", _needs("dataset_name"),
                                 ("train_prefs", {"dataset_mixture": {"datasets": [{"id": "d/",
                                                                                    "split": "train_prefs"}]}}),
                                 "read with dataset_name (the example's: d/)"),
    "dataset_test_split": Alias("dataset_mixture", _needs("dataset_name"),
                                ("test_prefs", {"dataset_mixture": {"datasets": [{"id": "d/", "split": "train"}],
                                                                    "eval_datasets": [{"id": "d/",
                                                                                       "split": "test_prefs"}]}}),
                                "read with dataset_name (the example's: d/); held out for eval"),
}

# No effect here, whatever the value: uploads, logging verbosity, data-loader and DDP tuning, kernels this project
# replaces. Listed in one warning line at start.
IGNORED: dict[str, str] = {
    **dict.fromkeys(("push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
                     "hub_always_push", "hub_revision", "hub_model_revision"), "no Hub uploads here"),
    "model_revision": "models are local folders",
    **dict.fromkeys(("log_level", "log_level_replica", "log_on_each_node", "logging_first_step", "logging_dir",
                     "disable_tqdm", "logging_nan_inf_filter", "skip_memory_metrics",
                     "include_num_input_tokens_seen", "include_for_metrics", "project", "trackio_space_id",
                     "trackio_bucket_id", "trackio_static_space_id"), "logging detail"),
    **dict.fromkeys(("dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
                     "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_drop_last",
                     "dataloader_in_order", "remove_unused_columns", "label_names", "length_column_name",
                     "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
                     "batch_eval_metrics", "prediction_loss_only", "use_cache", "local_rank", "use_cpu",
                     "torch_empty_cache_steps", "average_tokens_across_devices", "pad_to_multiple_of",
                     "precompute_ref_batch_size", "dataset_streaming", "ignore_bias_buffers", "lora_task_type",
                     "debug", "enable_jit_checkpoint", "save_on_each_node", "save_only_model", "ignore_data_skip",
                     "restore_callback_states_from_checkpoint", "torch_compile_backend", "torch_compile_mode",
                     "liger_kernel_config", "use_liger_kernel", "train_sampling_strategy"),
                    "batching, kernels and loaders are this project's own"),
    **dict.fromkeys(("ddp_backend", "ddp_timeout", "ddp_bucket_cap_mb", "ddp_broadcast_buffers",
                     "ddp_find_unused_parameters", "ddp_static_graph"),
                    "distribution comes from the accelerate config"),
}


def _only(*accepted: Any) -> Callable[[Any], bool]:
    return lambda value: any(value is a or (value == a and type(value) is type(a)) for a in accepted)


# Refused unless the value is what this project does anyway (then honoured, silently).
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_completion_length": (_only(None), "answers are cut to fit max_length (prompt + answer) after the prompt "
                                           "is cut to max_prompt_length; give those two"),
    "truncation_mode": (_only(), "data prep cuts the prompt from the left, then answers from the right"),
    "model_init_kwargs": (_only(None), "give torch_dtype / attn_implementation / trust_remote_code"),
    "router_aux_loss_coef": (_only(None, 0, 0.0), "no MoE auxiliary loss"),
    "activation_offloading": (_only(False), "not available; use gradient_checkpointing"),
    "pad_token": (_only(None), "data prep pads with the tokenizer's pad token (EOS when it has none)"),
    "disable_dropout": (_only(True), "dropout is always off (the policy equals its reference at step 0)"),
    "lora_target_parameters": (_only(None), "not available"),
    "lora_modules_to_save": (_only(None), "not available"),
    "use_rslora": (_only(False), "not available"),
    "use_dora": (_only(False), "not available"),
    "bnb_4bit_quant_type": (_only("nf4"), "4-bit weights are NF4"),
    "use_bnb_nested_quant": (_only(True), "4-bit weights always use double quantisation"),
    "bnb_4bit_quant_storage": (_only(None), "not available"),
    "do_predict": (_only(False), "no prediction step"),
    "deepspeed": (_only(None, ""), "DeepSpeed comes from the accelerate config (--accelerate_config)"),
    "fsdp": (_only(None, "", False, []), "not available; use DeepSpeed ZeRO through --accelerate_config"),
    "fsdp_config": (_only(None, {}), "not available; use DeepSpeed ZeRO through --accelerate_config"),
    "parallelism_config": (_only(None), "distribution comes from the accelerate config"),
    "accelerator_config": (_only(None, {}), "distribution comes from the accelerate config"),
    "tf32": (_only(None, False), "TF32 matmuls are not switched on"),
    "torch_compile": (_only(False), "not available"),
    "neftune_noise_alpha": (_only(None), "not available"),
    "label_smoothing_factor": (_only(0, 0.0), "use label_smoothing (DPO's label flip rate)"),
    "auto_find_batch_size": (_only(False), "give batch_size"),
    "full_determinism": (_only(False), "not available"),
    "load_best_model_at_end": (_only(False), "final/ is the last step's model (early_stopping_patience stops early)"),
    "metric_for_best_model": (_only(None, "loss", "eval_loss"), "early stopping watches the eval loss"),
    "greater_is_better": (_only(None, False), "early stopping watches the eval loss (lower is better)"),
    "eval_delay": (_only(0, 0.0), "not available"),
    "data_seed": (_only(None), "seed orders the pairs"),
    "bf16_full_eval": (_only(False), "evaluation runs in the training precision"),
    "fp16_full_eval": (_only(False), "evaluation runs in the training precision"),
    "optim_args": (_only(None, ""), "not available"),
    "optim_target_modules": (_only(None), "not available"),
    "activation_checkpointing": (_only(None, False), "use gradient_checkpointing"),
    "activation_checkpointing_kwargs": (_only(None, {}), "use gradient_checkpointing"),
    "chat_template": (_only(None), "give data_prep --chat_template FILE and train on its output"),
}


def is_known(name: str) -> bool:
    return name in ALIASES or name in IGNORED or name in REFUSED


def is_flag(name: str) -> bool:
    return name in ALIASES and ALIASES[name].flag or name in REFUSED and REFUSED[name][0](False)


@dataclass
class Translation:
    values: dict[str, Any]  # our field -> value
    ignored: list[str]  # names with no effect here
    refused: dict[str, str]  # name -> the one-line reason (raised by the caller once every source is read)


def translate(src: Mapping[str, Any], own_fields: set[str]) -> Translation:
    """Our fields from one source (a recipe, or the command line with values already parsed)."""
    out = Translation({}, [], {})
    setters: dict[str, str] = {}  # our field -> the name that set it, to refuse two names that disagree
    for name, value in src.items():
        if name in own_fields and name not in ALIASES:
            produced: dict[str, Any] | None = {name: value}
        elif name in ALIASES:
            try:
                produced = ALIASES[name].convert(value, src)
            except Refusal as refusal:
                out.refused[name] = f"{name}: {value!r}: {refusal}"
                continue
        elif name in IGNORED:
            out.ignored.append(name)
            continue
        elif name in REFUSED:
            accept, why = REFUSED[name]
            if not accept(value):
                out.refused[name] = f"{name}: {value!r} cannot be honoured here: {why}"
            continue
        else:
            produced = {name: value}  # unknown: the config reports it
        if produced is None:
            out.ignored.append(name)
            continue
        for field, field_value in produced.items():
            if field in out.values and out.values[field] != field_value and setters[field] != name:
                raise Refusal(f"{setters[field]} and {name} disagree on {field} ({out.values[field]!r} vs "
                              f"{field_value!r}); give one of them")
            out.values[field] = field_value
            setters[field] = name
    return out


def ignored_columns(mixture: Any) -> list[str]:
    """dataset_mixture columns that data prep does not read (it reads prompt, chosen, rejected and tools)."""
    if not isinstance(mixture, Mapping):
        return []
    used = {"prompt", "chosen", "rejected", "tools"}
    names = []
    for key in ("datasets", "eval_datasets"):
        for i, entry in enumerate(mixture.get(key) or []):
            if isinstance(entry, Mapping):
                names += [f"dataset_mixture.{key}[{i}].columns.{c}" for c in entry.get("columns") or []
                          if c not in used]
    return names


def warning_line(ignored: list[str]) -> str | None:
    """The one warning line listing every ignored key, in first-seen order."""
    names = list(dict.fromkeys(ignored))
    if not names:
        return None
    return (f"[dpo] warning: {len(names)} recipe keys have no effect here and are ignored: {', '.join(names)} "
            f"(README: Coming from TRL)")


def markdown_table(own_fields: set[str]) -> str:
    """The README's "Coming from TRL" tables: aliases with an example each, then the names that are ours as they
    are (`own_fields`: TrainConfig's), the ignored ones and the refused values."""
    rows = ["| TRL / alignment-handbook | ours | example | what differs |", "|---|---|---|---|"]
    for name, alias in ALIASES.items():
        value, ours = alias.example
        fields = ", ".join(f"`{k}: {_short(v)}`" for k, v in ours.items())
        example = f"`{name}: {_short(value)}` -> {fields or '(honoured as is)'}"
        rows.append(f"| `{name}` | `{alias.ours}` | {example} | {alias.note} |")
    own = sorted(own_fields & TRL_NAMES - set(ALIASES))
    rows += ["", f"Ours as they are (same name, same meaning): {', '.join(f'`{n}`' for n in own)}.", "",
             f"Ignored, listed in the start-up warning: {', '.join(f'`{n}`' for n in sorted(IGNORED))}.", "",
             "| refused unless the value is what this project does | why |", "|---|---|"]
    rows += [f"| `{name}` | {why} |" for name, (_, why) in sorted(REFUSED.items()) if name not in own_fields]
    return "\n".join(rows)


def _short(value: Any) -> str:
    if isinstance(value, (dict, list)):
        text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    else:
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 48 else text[:45] + "..."


# TRL 1.16's and alignment-handbook's names that are also ours (for the README; tests/test_trl_names.py walks TRL).
TRL_NAMES = frozenset({
    "output_dir", "run_name", "seed", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
    "max_grad_norm", "max_steps", "warmup_ratio", "gradient_accumulation_steps", "gradient_checkpointing",
    "logging_steps", "save_total_limit", "overwrite_output_dir", "beta", "loss_type", "loss_weights",
    "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "use_weighting", "ld_alpha", "discopop_tau",
    "rpo_alpha", "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "lora_r", "lora_alpha",
    "lora_dropout", "load_in_4bit", "load_in_8bit", "trust_remote_code", "max_length", "max_prompt_length",
    "dataset_num_proc", "dataset_mixture", "attn_implementation", "eval_on_start", "simpo_gamma",
})
