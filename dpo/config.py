"""The one training configuration: dataclass defaults <- YAML recipe <- command-line flags.

    cfg = load_config(["--config", "recipes/tiny_full.yaml", "--beta", "0.5", "--lora"])

Unknown keys and values of the wrong type are errors that name the key. Boolean flags take `true|false`; a bare
`--name` means true. `save_config` writes the resolved values as YAML beside the outputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpo.errors import UserError


class ConfigError(UserError):
    """A configuration that cannot be used; the message names the key."""

    label = "config error"


@dataclass
class TrainConfig:
    # --- paths
    model_path: str = ""  # a Hugging Face model folder (the SFT model); weights loaded as safetensors
    data_path: str = ""  # a data_prep output dir (train/, optional eval/, prep_report.json, tokenizer/)
    output_dir: str = "runs/dpo"
    run_name: str | None = None
    # --- DPO objective
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | simpo (see dpo/losses.py)
    label_smoothing: float = 0.0  # conservative / robust DPO when > 0 (sigmoid and simpo)
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    rpo_alpha: float | None = None  # adds rpo_alpha * NLL(chosen) to any loss
    average_log_prob: bool = False  # False: summed response log-probs (DPO paper); True: per-token mean
    # --- reference
    reference: str = "auto"  # auto | model | adapters_disabled | precomputed
    ref_model_path: str | None = None  # defaults to model_path
    # --- LoRA
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None: every linear layer except the LM head
    lora_adapter_path: str | None = None  # an SFT adapter merged into the frozen base before training
    merge_lora: bool = False  # also write final_merged/ (a full model)
    # --- batches and schedule
    batch_size: int = 4  # pairs per device per micro-step
    eval_batch_size: int | None = None  # defaults to batch_size
    gradient_accumulation_steps: int = 1
    max_steps: int = -1  # optimizer steps; -1: num_epochs over the data
    num_epochs: float = 1.0
    learning_rate: float = 5e-6
    lr_scheduler: str = "cosine"  # cosine | linear | constant (all with linear warm-up)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42
    # --- layout and precision
    layout: str = "packed"  # padded | packed (padding-free rows; exact, see tests/test_layouts.py)
    prefix_sharing: bool = True  # one [prompt | chosen | rejected] sequence per pair, prompt computed once
    max_tokens_per_row: int = 2048  # packed layouts: bound on one packed row (attention cost is quadratic)
    logits_chunk_size: int = 1024  # positions per chunk when taking log-probs of labels
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    # --- logging, evaluation, checkpoints
    logging_steps: int = 1
    eval_steps: int = 0  # 0: evaluate only at the end
    max_kl: float | None = None  # warn when eval kl exceeds this
    early_stopping_patience: int | None = None  # evaluations without improvement of eval loss
    early_stopping_min_delta: float = 0.0
    save_steps: int = 0  # 0: no intermediate checkpoints
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    resume_allow_changes: bool = False  # resume even when settings that change the run differ from the checkpoint's
    overwrite_output_dir: bool = False  # a fresh run replaces an earlier run's checkpoints, metrics and final model
    use_wandb: bool = False
    wandb_project: str = "dpo-pipeline"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        choices = {
            "loss_type": ("sigmoid", "ipo", "hinge", "simpo"),
            "reference": ("auto", "model", "adapters_disabled", "precomputed"),
            "lr_scheduler": ("cosine", "linear", "constant"),
            "mixed_precision": ("no", "bf16", "fp16"),
            "layout": ("padded", "packed"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(valid)}")
        positive = ("beta", "batch_size", "gradient_accumulation_steps", "logits_chunk_size", "max_tokens_per_row")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        for key in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "logging_steps", "eval_steps",
                    "save_steps", "label_smoothing"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing: must be in [0, 0.5), got {self.label_smoothing!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be -1 (use num_epochs) or > 0, got {self.max_steps!r}")
        if self.max_steps == -1 and not self.num_epochs > 0:
            raise ConfigError(f"num_epochs: must be > 0 when max_steps is -1, got {self.num_epochs!r}")
        if self.logging_steps == 0:
            raise ConfigError("logging_steps: must be >= 1")
        if self.reference == "adapters_disabled" and not self.lora:
            raise ConfigError("reference: 'adapters_disabled' needs --lora")
        if self.lora_adapter_path and not self.lora:
            raise ConfigError("lora_adapter_path: needs --lora (a fresh adapter is trained on top of it)")
        if self.merge_lora and not self.lora:
            raise ConfigError("merge_lora: needs --lora")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ConfigError("overwrite_output_dir: cannot be combined with resume_from_checkpoint (one removes "
                              "the checkpoints the other resumes from)")

    @property
    def reference_free(self) -> bool:
        return self.loss_type == "simpo"


# ----------------------------------------------------------------------------------------------- parsing


def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any, *, from_cli: bool) -> Any:
    """Convert `value` to the field type `tp`, or raise ConfigError naming `key`."""
    inner, optional = _strip_optional(tp)
    if value is None or (from_cli and optional and str(value).lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: must not be null")
    want = inner.__name__ if isinstance(inner, type) else str(inner)
    if inner is bool:
        if isinstance(value, bool):
            return value
        if from_cli and str(value).lower() in ("true", "1", "yes"):
            return True
        if from_cli and str(value).lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_cli:
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-6 as a string; accept numeric strings everywhere
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if typing.get_origin(inner) is list:
        if from_cli and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {want}")  # pragma: no cover - guards new fields


def _apply(values: dict[str, Any], updates: dict[str, Any], *, from_cli: bool, source: str) -> None:
    hints = _type_hints()
    for key, value in updates.items():
        if key not in hints:
            raise ConfigError(f"unknown key {key!r} in {source}")
        values[key] = _coerce(key, value, hints[key], from_cli=from_cli)


def _parse_cli(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    hints = _type_hints()
    config_path: str | None = None
    updates: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (flags look like --name value)")
        name, eq, inline = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name == "config":
            config_path = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
            if config_path is None:
                raise ConfigError("--config needs a path")
            i += 1 if eq else 2
            continue
        if name not in hints:
            raise ConfigError(f"unknown key {name!r} on the command line")
        if eq:
            updates[name] = inline
            i += 1
            continue
        is_bool = _strip_optional(hints[name])[0] is bool
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if is_bool and (nxt is None or nxt.startswith("--")):
            updates[name] = "true"  # a bare boolean flag means true
            i += 1
            continue
        if nxt is None:
            raise ConfigError(f"--{name} needs a value")
        updates[name] = nxt
        i += 2
    return config_path, updates


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then the YAML file of `--config`, then the flags; validated."""
    if argv is None:
        import sys

        argv = sys.argv[1:]
    config_path, cli_updates = _parse_cli(list(argv))
    values: dict[str, Any] = {}
    if config_path is not None:
        path = Path(config_path)
        if not path.is_file():
            raise ConfigError(f"config: no such file {config_path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{config_path}:{mark.line + 1}" if mark is not None else config_path
            raise ConfigError(f"config: {where} is not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config: {config_path} must hold a mapping of key: value")
        _apply(values, loaded, from_cli=False, source=config_path)
    _apply(values, cli_updates, from_cli=True, source="the command line")
    return TrainConfig(**values)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "TrainConfig", "load_config", "save_config", "config_to_dict"]
