"""dpo/trl_names.py: every TRL name is ours, an alias with the same meaning, ignored out loud, or refused.

Oracles: each alias's parsed config equals the config parsed from the our-field values it documents (from YAML and
from the command line); the names of trl.DPOConfig / ModelConfig / ScriptArguments (TRL 1.16) are walked so a name
TRL adds later cannot slip through unclassified."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from dpo import trl_names
from dpo.config import ConfigError, TrainConfig, config_to_dict, load_config
from dpo.train import interval_steps, scheduler_name

ROOT = Path(__file__).resolve().parents[1]
OWN = {f.name for f in dataclasses.fields(TrainConfig)}
# Names read together with another: (that other in TRL's words, the same in ours); an example's fields come on top.
CONTEXT: dict[str, tuple[dict, dict]] = {
    "lr_scheduler_kwargs": ({"lr_scheduler_type": "cosine_with_min_lr"}, {"lr_scheduler": "cosine"}),
    "dataset_splits": ({"dataset_mixer": {"d/": 1.0}}, {}),
    **{k: ({"dataset_name": "d/"}, {}) for k in ("dataset_config", "dataset_train_split", "dataset_test_split")}}


def parse(tmp_path: Path, recipe: dict, argv: tuple[str, ...] = ()) -> TrainConfig:
    path = tmp_path / f"r{len(list(tmp_path.iterdir()))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_config(["--config", str(path), *argv])


@pytest.mark.parametrize("name", sorted(trl_names.ALIASES))
def test_alias_parses_to_the_field_it_maps_to(tmp_path, name):
    alias = trl_names.ALIASES[name]
    value, ours = alias.example
    context, context_ours = CONTEXT.get(name, ({}, {}))
    via_trl = parse(tmp_path, {**context, name: value})
    assert config_to_dict(via_trl) == config_to_dict(parse(tmp_path, {**context_ours, **ours}))
    assert ours == {} or set(ours) <= OWN, f"{name} maps to fields TrainConfig lacks: {set(ours) - OWN}"


@pytest.mark.parametrize("name", sorted(n for n, a in trl_names.ALIASES.items() if n not in CONTEXT))
def test_alias_on_the_command_line(tmp_path, name):
    value, _ = trl_names.ALIASES[name].example
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    assert config_to_dict(load_config([f"--{name}", text])) == config_to_dict(parse(tmp_path, {name: value}))


def trl_field_names() -> set[str]:
    trl = pytest.importorskip("trl")
    names = set()
    for cls in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments):
        names |= {f.name for f in dataclasses.fields(cls)}
    return names


def test_no_trl_name_is_silently_ignored():
    """Every field of TRL's DPOConfig (with TrainingArguments'), ModelConfig and ScriptArguments is ours, an alias,
    ignored (warned about) or refused unless its value is what we do."""
    classified = OWN | set(trl_names.ALIASES) | set(trl_names.IGNORED) | set(trl_names.REFUSED)
    missing = sorted(trl_field_names() - classified)
    assert not missing, f"TRL names with no entry in dpo/trl_names.py: {missing}"


def test_trl_defaults_are_honoured_or_listed(tmp_path, capsys):
    """A recipe holding every TRL name at its TRL default parses (nothing refused that TRL does by default, except
    where ours differs: listed), and the ignored ones come back in one warning line."""
    import trl
    defaults = {}
    for cls in (trl.DPOConfig, trl.ModelConfig, trl.ScriptArguments):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING and isinstance(f.default, (bool, int, float, str, type(None))):
                defaults.setdefault(f.name, f.default)
    # Defaults of TRL this project cannot reproduce (the README lists them under "what differs").
    differ = {"truncation_mode", "use_bnb_nested_quant", "max_length", "max_prompt_length", "output_dir", "dtype",
              "logging_steps", "save_steps", "eval_steps", "num_train_epochs", "learning_rate", "warmup_steps",
              "report_to", "lr_scheduler_type", "optim", "eval_strategy", "save_strategy", "logging_strategy",
              "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split", "model_name_or_path",
              "bf16", "fp16", "lr_scheduler_kwargs", "resume_from_checkpoint", "hub_strategy",
              "eval_on_start", "attn_implementation", "run_name", "per_device_train_batch_size",
              "per_device_eval_batch_size", "max_steps", "seed", "lora_target_modules"}
    recipe = {k: v for k, v in defaults.items() if k not in differ and k not in OWN}
    capsys.readouterr()
    parse(tmp_path, recipe)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[dpo] warning:")
    listed = set(err[0].split(": ", 2)[2].split(" (README")[0].split(", "))
    expected = {k for k in recipe if k in trl_names.IGNORED}
    expected |= {k for k in recipe
                 if k in trl_names.ALIASES and trl_names.ALIASES[k].convert(recipe[k], recipe) is None}
    assert listed == expected


def test_warning_is_one_line_and_names_every_ignored_key(tmp_path, capsys):
    parse(tmp_path, {"push_to_hub": True, "hub_model_id": "x", "log_level": "info", "use_liger_kernel": True,
                     "gradient_checkpointing_kwargs": {"use_reentrant": True}}, ("--model_revision", "main"))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for name in ("push_to_hub", "hub_model_id", "log_level", "use_liger_kernel", "gradient_checkpointing_kwargs",
                 "model_revision"):
        assert name in err[0]


def test_nothing_printed_without_ignored_keys(tmp_path, capsys):
    parse(tmp_path, {"per_device_train_batch_size": 2, "bf16": False})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("recipe, words", [
    ({"optim": "adafactor"}, "optim: 'adafactor'"),
    ({"optim": "adamw_bnb_8bit"}, "AdamW variants"),
    ({"lr_scheduler_type": "polynomial"}, "lr_scheduler_type"),
    ({"lr_scheduler_type": "cosine_with_min_lr"}, "needs lr_scheduler_kwargs"),
    ({"lr_scheduler_type": "constant", "warmup_ratio": 0.1}, "warm-up"),
    ({"eval_strategy": "best"}, "eval_strategy: 'best'"),
    ({"save_strategy": "best"}, "save_strategy"),
    ({"report_to": ["mlflow"]}, "mlflow"),
    ({"max_completion_length": 256}, "max_completion_length"),
    ({"truncation_mode": "keep_end"}, "truncation_mode"),
    ({"use_dora": True}, "use_dora"),
    ({"torch_compile": True}, "torch_compile"),
    ({"deepspeed": "ds.json"}, "--accelerate_config"),
    ({"bf16": True, "fp16": True}, "choose one"),
    ({"torch_dtype": "int8"}, "torch_dtype"),
    ({"lr_scheduler_kwargs": {"power": 2.0}}, "power"),
    ({"per_device_train_batch_size": 4, "batch_size": 8}, "disagree"),
    ({"dataset_train_split": "train"}, "needs dataset_name"),
])
def test_values_we_cannot_honour_are_refused_in_one_line(tmp_path, recipe, words):
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, recipe)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_command_line_can_replace_a_refused_value(tmp_path):
    """A recipe value we cannot honour is refused, but a command-line value we honour replaces it."""
    with pytest.raises(ConfigError, match="tf32"):
        parse(tmp_path, {"tf32": True})
    assert parse(tmp_path, {"tf32": True}, ("--tf32", "false")) == TrainConfig()


def test_command_line_wins_over_the_recipe_through_aliases(tmp_path):
    cfg = parse(tmp_path, {"bf16": True, "per_device_train_batch_size": 8, "use_peft": True},
                ("--bf16", "false", "--per_device_train_batch_size", "2", "--lora_target_modules", "q_proj,v_proj"))
    assert (cfg.mixed_precision, cfg.batch_size, cfg.lora, cfg.lora_target_modules) == ("no", 2, True,
                                                                                        ["q_proj", "v_proj"])
    assert load_config(["--use_peft", "--fp16"]).mixed_precision == "fp16"  # bare boolean flags


def test_strategies(tmp_path):
    assert parse(tmp_path, {"eval_strategy": "steps", "eval_steps": 20}).eval_steps == 20
    assert parse(tmp_path, {"eval_strategy": "steps", "logging_steps": 5}).eval_steps == 5  # TA: eval_steps = logging
    no = parse(tmp_path, {"eval_strategy": "no", "eval_steps": 20, "do_eval": True})
    assert (no.eval_steps, no.do_eval) == (0, True)  # the handbook evaluates once at the end when do_eval
    assert parse(tmp_path, {"eval_strategy": "no"}).do_eval is False
    assert parse(tmp_path, {"save_strategy": "no", "save_steps": 100}).save_steps == 0
    assert parse(tmp_path, {"save_strategy": "steps"}).save_steps == 500  # TrainingArguments' default


def test_fractional_intervals_resolve_like_training_arguments(tmp_path):
    """TrainingArguments: a float below 1 is that share of max_steps, rounded up."""
    cfg = parse(tmp_path, {"save_steps": 0.5, "eval_steps": 0.25, "logging_steps": 3})
    assert (cfg.save_steps, cfg.eval_steps, cfg.logging_steps) == (0.5, 0.25, 3)
    assert [interval_steps(v, 10, 4) for v in (cfg.save_steps, cfg.eval_steps, cfg.logging_steps)] == [5, 3, 3]
    assert interval_steps(0.5, 3, 3) == 2
    epoch = parse(tmp_path, {"eval_strategy": "epoch", "save_strategy": "epoch", "logging_strategy": "epoch"})
    assert (epoch.eval_steps, epoch.save_steps, epoch.logging_steps, epoch.do_eval) == ("epoch",) * 3 + (True,)
    assert interval_steps(epoch.save_steps, 10, 4) == 4
    assert load_config(["--save_steps", "epoch"]).save_steps == "epoch"
    with pytest.raises(ConfigError, match="or epoch"):
        TrainConfig(save_steps="epochs")
    with pytest.raises(ConfigError, match="share of the run"):
        parse(tmp_path, {"save_steps": 1.5})
    assert parse(tmp_path, {"save_steps": 100.0}).save_steps == 100  # a whole number stays a step count


def test_cosine_with_min_lr_matches_transformers(tmp_path):
    """Our cosine with min_lr_rate is transformers' cosine_with_min_lr (the scheduler TRL builds), step by step."""
    import torch
    from transformers import get_scheduler
    cfg = parse(tmp_path, {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                           "learning_rate": 1e-3})
    assert (cfg.lr_scheduler, cfg.min_lr_rate, scheduler_name(cfg)) == ("cosine", 0.1, "cosine_with_min_lr")
    lrs = []
    for _ in range(1):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = get_scheduler(scheduler_name(cfg), opt, num_warmup_steps=2, num_training_steps=10,
                              scheduler_specific_kwargs={"min_lr_rate": cfg.min_lr_rate})
        for _ in range(10):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
    import math
    expected = [1e-3 * s / 2 if s < 2 else
                1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8))) for s in range(10)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    minimum = parse(tmp_path, {"lr_scheduler_type": "cosine_with_min_lr", "learning_rate": 2e-6,
                               "lr_scheduler_kwargs": {"min_lr": 2e-7}})
    assert minimum.min_lr_rate == pytest.approx(0.1)


def test_rmsprop_is_training_arguments_rmsprop(tmp_path):
    """optim: rmsprop builds torch's RMSprop with the learning rate and TrainingArguments' decay groups."""
    import torch

    from dpo.train import build_optimizer
    cfg = parse(tmp_path, {"optim": "rmsprop", "learning_rate": 5e-7, "weight_decay": 0.01})
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.RMSprop
    assert [g["lr"] for g in optimizer.param_groups] == [5e-7, 5e-7]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]
    assert optimizer.defaults["alpha"] == 0.99 and optimizer.defaults["eps"] == 1e-8
    assert type(build_optimizer(model, parse(tmp_path, {"optim": "adamw_torch_fused"}))) is torch.optim.AdamW


def test_mixer_and_dataset_name_become_a_mixture(tmp_path):
    mixer = parse(tmp_path, {"dataset_mixer": {"a/": 1.0, "b/": 0.5}, "dataset_splits": ["train_prefs", "test_prefs"]})
    assert mixer.dataset_mixture == {
        "datasets": [{"id": "a/", "split": "train_prefs", "weight": 1.0},
                     {"id": "b/", "split": "train_prefs", "weight": 0.5}],
        "eval_datasets": [{"id": "a/", "split": "test_prefs"}, {"id": "b/", "split": "test_prefs"}]}
    named = parse(tmp_path, {"dataset_name": "uf/", "dataset_config": "default", "dataset_train_split": "train_prefs",
                             "dataset_test_split": "test_prefs"})
    assert named.dataset_mixture == {"datasets": [{"id": "uf/", "split": "train_prefs", "config": "default"}],
                                     "eval_datasets": [{"id": "uf/", "split": "test_prefs", "config": "default"}]}
    with pytest.raises(ConfigError, match="data_path"):
        parse(tmp_path, {"dataset_name": "uf/", "data_path": "prepped/"})


def test_readme_table_is_generated_from_the_code():
    text = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- trl-names:start -->\n(.*?)\n<!-- trl-names:end -->", text, flags=re.S)
    assert found, "README lacks the trl-names table markers"
    assert found.group(1).strip() == trl_names.markdown_table(OWN).strip(), \
        "README's TRL table differs from dpo.trl_names.markdown_table(); paste the new one"
