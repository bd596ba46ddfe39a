"""The one training configuration: dataclass defaults <- YAML recipe <- command-line flags.

    cfg = load_config(["--config", "recipes/tiny_full.yaml", "--beta", "0.5", "--lora"])

Unknown keys and values of the wrong type are errors that name the key. Boolean flags take `true|false`; a bare
`--name` means true. `save_config` writes the resolved values as YAML beside the outputs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dpo import losses, preemption, trl_names
from dpo.atomic import write_text_atomic
from dpo.errors import UserError
from dpo.listwise import LISTWISE_LOSSES
from dpo.mixture import MixtureError, parse_mixture
from dpo.trl_names import Translation


class ConfigError(UserError):
    """A configuration that cannot be used; the message names the key."""

    label = "config error"


@dataclass
class TrainConfig:
    # --- paths
    model_path: str = ""  # a Hugging Face model folder (the SFT model); weights loaded as safetensors
    data_path: str = ""  # a data_prep output dir (train/, optional eval/, prep_report.json, tokenizer/)
    output_dir: str = "runs/dpo"  # where config.yaml, metrics.jsonl, tensorboard/, checkpoints and final/ go
    run_name: str | None = None  # the wandb run name
    # --- raw data named by the recipe: prepared on first use into a cache, reused after (dpo/recipe_data.py)
    dataset_mixture: dict[str, Any] | None = None  # {datasets: [{id, config, split, columns, weight}], seed, ...}
    max_length: int | None = None  # raw data: prompt + answer tokens, each side (prep's default 1024)
    max_prompt_length: int | None = None  # raw data: prompt tokens (prep's default max_length // 2)
    dataset_num_proc: int | None = None  # raw data: tokenizer processes of data prep
    data_cache_dir: str = ""  # prepared raw data; "" is $DPO_DATA_CACHE, else ~/.cache/dpo-pipeline/data
    # --- DPO objective
    beta: float = 0.1  # strength of the pull toward the reference (DPO's β); 0.1 is the paper's default
    loss_type: str | list[str] = "sigmoid"  # a loss of dpo/losses.py (README table) or a list of them, mixed
    loss_weights: list[float] | None = None  # weights of a loss_type list, e.g. [0.8, 0.2, 1.0]; default 1 each
    label_smoothing: float = 0.0  # label-flip rate: sigmoid, simpo, robust, exo_pair, aot, aot_unpaired
    discopop_tau: float = 0.05  # DiscoPOP's temperature (loss_type discopop)
    f_divergence_type: str = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence (f-DPO)
    f_alpha_divergence_coef: float = 0.5  # alpha of f_divergence_type alpha_divergence
    use_weighting: bool = False  # WPO: weight each pair by the policy's per-token likelihood of its answers
    ld_alpha: float | None = None  # LD-DPO: weight of answer tokens beyond the shorter answer's length, in [0, 1]
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    rpo_alpha: float | None = None  # adds rpo_alpha * NLL(chosen) to any loss
    average_log_prob: bool = False  # False: summed response log-probs (DPO paper); True: per-token mean
    listwise_loss: str | None = None  # k answers: all_pairs | best_vs_rest | plackett_luce | softmax_negatives
    # --- reference
    reference: str = "auto"  # auto | model | adapters_disabled | precomputed
    ref_model_path: str | None = None  # defaults to model_path
    sync_ref_model: bool = False  # TR-DPO: ref = alpha * policy + (1 - alpha) * ref every ref_model_sync_steps
    ref_model_mixup_alpha: float = 0.6  # TR-DPO's alpha; 1.0 is a hard update (the reference becomes the policy)
    ref_model_sync_steps: int = 512  # optimizer steps between reference updates (TR-DPO)
    # --- LoRA
    lora: bool = False  # train LoRA adapters instead of every weight
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)
    lora_dropout: float = 0.05  # dropout on the LoRA branch
    lora_target_modules: list[str] | None = None  # None: every linear layer except the LM head
    lora_adapter_path: str | None = None  # an SFT adapter merged into the frozen base before training
    merge_lora: bool = False  # also write final_merged/ (a full model)
    load_in_4bit: bool = False  # QLoRA: the LoRA base in 4-bit NF4 with double quantisation (needs bitsandbytes)
    load_in_8bit: bool = False  # the LoRA base in 8-bit LLM.int8() (needs bitsandbytes)
    # --- batches and schedule
    batch_size: int = 4  # pairs per device per micro-step
    eval_batch_size: int | None = None  # eval pairs per device per forward; none: 2 x batch_size (no-grad: it fits)
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    max_steps: int = -1  # optimizer steps; -1: num_epochs over the data
    num_epochs: float = 1.0  # passes over the training pairs (fractions allowed) when max_steps is -1
    learning_rate: float = 5e-6  # peak AdamW learning rate
    lr_scheduler: str = "cosine"  # cosine | linear | constant (all with linear warm-up)
    min_lr_rate: float = 0.0  # cosine: decay to this fraction of the peak learning rate instead of 0
    optim: str = "adamw"  # adamw | rmsprop (torch's RMSprop at its defaults, as TrainingArguments' rmsprop)
    warmup_steps: int = 0  # optimizer steps of linear warm-up from 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    weight_decay: float = 0.0  # AdamW weight decay (not on biases and norms)
    adam_beta1: float = 0.9  # AdamW β1
    adam_beta2: float = 0.999  # AdamW β2
    adam_epsilon: float = 1e-8  # AdamW ε
    max_grad_norm: float = 1.0  # 0 disables clipping
    seed: int = 42  # seeds the weights of new layers and the order of the pairs
    # --- layout and precision
    layout: str = "auto"  # auto (fastest exact layout on this model) | packed | padded | single; see dpo/layouts.py
    prefix_sharing: bool | None = None  # one [prompt | chosen | rejected] sequence per pair; none: auto (probed)
    max_tokens_per_row: int = 2048  # packed layouts: bound on one packed row (attention cost is quadratic)
    attn_implementation: str = "auto"  # auto (flex on CUDA, else sdpa)|sdpa|eager|flex_attention|flash_attention_2|3
    allow_nondeterministic_train: bool = False  # train a model that stays random in train mode with dropout off
    logits_chunk_size: int = 256  # scored positions per LM-head chunk: extra memory ~ 3 x chunk x vocab x 4 bytes
    mixed_precision: str = "no"  # no | bf16 | fp16
    torch_dtype: str = "auto"  # auto|bf16|fp16|fp32 of frozen weights (LoRA base, reference); auto: model's if mixed
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about one more forward
    sequence_parallel_size: int = 1  # processes splitting each row (Ulysses); data-parallel degree = processes / N
    trust_remote_code: bool = False  # run model code shipped with the checkpoint (only for folders you trust)
    # --- logging, evaluation, checkpoints
    logging_steps: int | float | str = 1  # write train metrics every N steps (float < 1: share of the run; epoch)
    eval_steps: int | float | str = 0  # 0: evaluate only at the end (float < 1: every that share of the run; epoch)
    eval_on_start: bool = False  # also evaluate the starting model before the first update, logged as step 0
    eval_max_pairs: int | None = None  # evaluate a fixed, seeded subset of this many eval pairs; none: all of them
    do_eval: bool = True  # false: no evaluation, even when the data has an eval split
    max_logratio: float | None = None  # warn when |eval logratio/chosen| exceeds this (drift from the reference)
    early_stopping_patience: int | None = None  # evaluations without improvement of eval loss
    early_stopping_min_delta: float = 0.0  # a smaller fall of the eval loss is no improvement
    save_steps: int | float | str = 0  # 0: no intermediate checkpoints (float < 1: share of the run; epoch)
    save_total_limit: int | None = None  # keep only the newest N checkpoints
    resume_from_checkpoint: str | None = None  # a checkpoint dir or "latest"
    save_on_signal: str | list[str] = "SIGTERM,SIGUSR1"  # on these: finish the step, checkpoint, exit 75; none: off
    resume_allow_changes: bool = False  # resume even when settings that change the run differ from the checkpoint's
    overwrite_output_dir: bool = False  # a fresh run replaces an earlier run's checkpoints, metrics and final model
    use_wandb: bool = False  # also log to Weights & Biases (pip install wandb)
    wandb_project: str = "dpo-pipeline"  # the wandb project

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for key, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        choices = {
            "reference": ("auto", "model", "adapters_disabled", "precomputed"),
            "lr_scheduler": ("cosine", "linear", "constant"),
            "mixed_precision": ("no", "bf16", "fp16"),
            "layout": ("auto", "padded", "packed", "single"),
            "torch_dtype": ("auto", "bf16", "fp16", "fp32"),
            "attn_implementation": ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2",
                                    "flash_attention_3"),
            "optim": ("adamw", "rmsprop"),
        }
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(valid)}")
        positive = ("batch_size", "gradient_accumulation_steps", "logits_chunk_size", "max_tokens_per_row",
                    "sequence_parallel_size")
        for key in positive:
            if not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0, got {getattr(self, key)!r}")
        for key in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "logging_steps", "eval_steps",
                    "save_steps"):
            if not isinstance(getattr(self, key), str) and getattr(self, key) < 0:  # "epoch": checked below
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)!r}")
        for key in ("logging_steps", "eval_steps", "save_steps"):
            value = getattr(self, key)
            if isinstance(value, float) and not 0 < value < 1:
                raise ConfigError(f"{key}: a float must be a share of the run in (0, 1), got {value!r}")
            if isinstance(value, str) and value != "epoch":
                raise ConfigError(f"{key}: a number of steps, a share of the run below 1, or epoch; got {value!r}")
        if not 0 <= self.min_lr_rate < 1:
            raise ConfigError(f"min_lr_rate: must be in [0, 1), got {self.min_lr_rate!r}")
        if self.min_lr_rate and self.lr_scheduler != "cosine":
            raise ConfigError("min_lr_rate: applies to lr_scheduler cosine")
        if self.dataset_mixture is not None and self.data_path:
            raise ConfigError("dataset_mixture and data_path: give one (raw data to prepare, or a prepared folder)")
        if self.dataset_mixture is not None:
            try:
                parse_mixture(self.dataset_mixture)
            except MixtureError as error:
                raise ConfigError(str(error)) from None
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps: must be -1 (use num_epochs) or > 0, got {self.max_steps!r}")
        if self.max_steps == -1 and not self.num_epochs > 0:
            raise ConfigError(f"num_epochs: must be > 0 when max_steps is -1, got {self.num_epochs!r}")
        for key in ("eval_batch_size", "eval_max_pairs"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise ConfigError(f"{key}: must be > 0 (or none), got {getattr(self, key)!r}")
        if self.logging_steps == 0:
            raise ConfigError("logging_steps: must be >= 1")
        if self.reference == "adapters_disabled" and not self.lora:
            raise ConfigError("reference: 'adapters_disabled' needs --lora")
        if self.lora_adapter_path and not self.lora:
            raise ConfigError("lora_adapter_path: needs --lora (a fresh adapter is trained on top of it)")
        if self.max_logratio is not None and not self.max_logratio > 0:
            raise ConfigError(f"max_logratio: must be > 0, got {self.max_logratio!r}")
        if self.merge_lora and not self.lora:
            raise ConfigError("merge_lora: needs --lora")
        if self.layout == "single" and self.prefix_sharing:
            raise ConfigError("layout single runs each sequence alone: it cannot share a prompt (prefix_sharing)")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ConfigError("overwrite_output_dir: cannot be combined with resume_from_checkpoint (one removes "
                              "the checkpoints the other resumes from)")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit: choose one")
        if (self.load_in_4bit or self.load_in_8bit) and not self.lora:
            raise ConfigError(f"{'load_in_4bit' if self.load_in_4bit else 'load_in_8bit'}: quantised weights cannot "
                              f"be fine-tuned in full; add --lora (QLoRA trains adapters on the quantised base)")
        try:
            preemption.parse_signals(self.save_on_signal)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._validate_objective()

    def _validate_objective(self) -> None:
        """The loss (mix) and its hyper-parameters, asked of the loss registry; TR-DPO and LD-DPO prerequisites."""
        try:
            losses.check_objective(
                self.loss_type, self.loss_weights, beta=self.beta, label_smoothing=self.label_smoothing,
                discopop_tau=self.discopop_tau, f_divergence_type=self.f_divergence_type,
                f_alpha_divergence_coef=self.f_alpha_divergence_coef, use_weighting=self.use_weighting,
                ld_alpha=self.ld_alpha)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.ld_alpha is not None and (self.average_log_prob or losses.wants_mean_logps(self.loss_type)):
            raise ConfigError("ld_alpha: LD-DPO weights summed answer log-probs; it cannot be combined with "
                              "average_log_prob or a loss on per-token means (simpo)")
        if self.listwise_loss is not None:
            if self.listwise_loss not in LISTWISE_LOSSES:
                raise ConfigError(f"listwise_loss: unknown {self.listwise_loss!r}; expected one of "
                                  f"{', '.join(LISTWISE_LOSSES)}")
            if self.use_weighting or self.ld_alpha is not None:
                raise ConfigError("listwise_loss: use_weighting (WPO) and ld_alpha (LD-DPO) are defined for pairs "
                                  "only (both weigh one answer against the other)")
        if self.ld_alpha is not None and self.reference == "precomputed":
            raise ConfigError("ld_alpha: precomputed reference log-probs are plain sums, not LD-DPO weighted; use "
                              "--reference model (or adapters_disabled with LoRA)")
        if self.sync_ref_model:
            if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
                raise ConfigError(f"ref_model_mixup_alpha: must be in [0, 1], got {self.ref_model_mixup_alpha!r}")
            if self.ref_model_sync_steps < 1:
                raise ConfigError(f"ref_model_sync_steps: must be >= 1, got {self.ref_model_sync_steps!r}")
            if self.reference == "precomputed":
                raise ConfigError("sync_ref_model: a precomputed reference cannot be synced (its log-probs and "
                                  "fingerprint are for the fixed starting model); use --reference model")
            if self.lora:
                raise ConfigError("sync_ref_model: not supported with LoRA, whose reference is the base weights "
                                  "under the adapter (no separate copy to update); use full fine-tuning")
            if self.reference_free:
                raise ConfigError(f"sync_ref_model: loss_type {self.loss_type!r} uses no reference to sync")

    @property
    def loss_types(self) -> list[str]:
        """loss_type as a list (one element for a single loss)."""
        return [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)

    @property
    def reference_free(self) -> bool:
        return losses.reference_free(self.loss_type)


# ----------------------------------------------------------------------------------------------- parsing


def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if (typing.get_origin(tp) in (typing.Union, types.UnionType)) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _cli_list(value: str) -> list[Any]:
    """A list from the command line: YAML flow style '[a, b]' or a comma list 'a,b'."""
    if value.strip().startswith("["):
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = None
        if isinstance(parsed, list):
            return parsed
    return [v.strip() for v in value.split(",") if v.strip()]


def _coerce(key: str, value: Any, tp: Any, *, from_cli: bool) -> Any:
    """Convert `value` to the field type `tp`, or raise ConfigError naming `key`."""
    if set(typing.get_args(tp)) == {str, list[str]}:  # a name or a list of names (loss_type)
        if from_cli and isinstance(value, str) and ("," in value or value.strip().startswith("[")):
            value = _cli_list(value)
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
            return value
        raise ConfigError(f"{key}: expected a name or a non-empty list of names, got {value!r}")
    if set(typing.get_args(tp)) == {int, float, str}:  # a step count, a share of the run below 1, or "epoch"
        if value == "epoch":
            return value
        number = _coerce(key, value, float, from_cli=from_cli)
        return int(number) if number.is_integer() else number
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
    if typing.get_origin(inner) is dict:
        if from_cli and isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    if typing.get_origin(inner) is list:
        if from_cli and isinstance(value, str):
            value = _cli_list(value)
        if typing.get_args(inner) == (float,) and isinstance(value, list):
            return [_coerce(f"{key}[{i}]", v, float, from_cli=from_cli) for i, v in enumerate(value)]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {want}")  # pragma: no cover - guards new fields


def _apply(values: dict[str, Any], updates: dict[str, Any], *, from_cli: bool, source: str,
           translation: Translation) -> None:
    """Updates from one source, TRL's names translated to ours (dpo/trl_names.py)."""
    hints = _type_hints()
    if from_cli:  # TRL-only names come as text: read it as YAML would (true, 0.5, [a, b], {k: v})
        updates = {k: (_yaml_value(v) if trl_names.is_known(k) else v) for k, v in updates.items()}
    try:
        got = trl_names.translate(updates, set(hints))
    except trl_names.Refusal as refusal:
        raise ConfigError(f"{refusal} in {source}") from None
    for name in updates:  # a later source (the command line) may set a refused name to a value we honour
        translation.refused.pop(name, None)
    translation.refused.update({k: f"{v} ({source})" for k, v in got.refused.items()})
    translation.ignored += got.ignored
    if got.values.get("dataset_mixture") is not None:
        translation.ignored += trl_names.ignored_columns(got.values["dataset_mixture"])
    for key, value in got.values.items():
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
        if name not in hints and not trl_names.is_known(name):
            raise ConfigError(f"unknown key {name!r} on the command line")
        if eq:
            updates[name] = inline
            i += 1
            continue
        is_bool = _strip_optional(hints[name])[0] is bool if name in hints else trl_names.is_flag(name)
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
        argv = sys.argv[1:]
    config_path, cli_updates = _parse_cli(list(argv))
    values: dict[str, Any] = {}
    translation = trl_names.Translation({}, [], {})
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
        _apply(values, loaded, from_cli=False, source=config_path, translation=translation)
    _apply(values, cli_updates, from_cli=True, source="the command line", translation=translation)
    if translation.refused:
        raise ConfigError(next(iter(translation.refused.values())))
    cfg = TrainConfig(**values)
    line = trl_names.warning_line(translation.ignored)
    if line and os.environ.get("RANK", "0") == "0":  # once per run, not once per process
        print(line, file=sys.stderr)
    return cfg


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    write_text_atomic(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = ["ConfigError", "TrainConfig", "load_config", "save_config", "config_to_dict"]
