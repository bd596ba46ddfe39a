"""The config contract: defaults <- YAML <- flags, errors that name the key, every shipped recipe loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dpo.config import ConfigError, TrainConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_tutorial():
    cfg = load_config([])
    assert (cfg.beta, cfg.learning_rate, cfg.max_grad_norm, cfg.lr_scheduler) == (0.1, 5e-6, 1.0, "cosine")
    assert cfg.average_log_prob is False and cfg.loss_type == "sigmoid" and cfg.reference == "auto"


def test_yaml_then_flags_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("beta: 0.5\nlearning_rate: 1.0e-4\nbatch_size: 8\nlora: true\n")
    cfg = load_config(["--config", str(recipe), "--beta", "0.25", "--batch_size=2"])
    assert cfg.beta == 0.25  # the flag wins
    assert cfg.learning_rate == 1e-4  # from YAML
    assert cfg.batch_size == 2
    assert cfg.lora is True


def test_boolean_flags_bare_and_explicit():
    assert load_config(["--lora"]).lora is True
    assert load_config(["--lora", "--merge_lora"]).merge_lora is True
    assert load_config(["--lora", "false"]).lora is False
    assert load_config(["--gradient_checkpointing", "true"]).gradient_checkpointing is True


def test_optional_and_list_values():
    cfg = load_config(
        ["--rpo_alpha", "0.5", "--lora_target_modules", "q_proj,v_proj", "--early_stopping_patience", "3"]
    )
    assert cfg.rpo_alpha == 0.5 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.early_stopping_patience == 3
    assert load_config(["--rpo_alpha", "none"]).rpo_alpha is None


@pytest.mark.parametrize("argv", [
    ["--loss_type", "[sigmoid, bco_pair, sft]", "--loss_weights", "[0.8, 0.2, 1.0]"],  # the README's example
    ["--loss_type", "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1"],
    ["--loss_type=[sigmoid,bco_pair,sft]", "--loss_weights=[0.8,0.2,1.0]"],
])
def test_loss_type_lists_from_the_command_line(argv):
    cfg = load_config(argv)
    assert cfg.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.loss_weights == [0.8, 0.2, 1.0]
    assert cfg.loss_types == ["sigmoid", "bco_pair", "sft"] and not cfg.reference_free


def test_loss_type_list_from_yaml_round_trips(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss_type: [sigmoid, bco_pair]\nloss_weights: [0.8, 1]\nuse_weighting: true\n")
    cfg = load_config(["--config", str(recipe)])
    assert cfg.loss_type == ["sigmoid", "bco_pair"] and cfg.loss_weights == [0.8, 1.0] and cfg.use_weighting
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(["--config", str(tmp_path / "resolved.yaml")]) == cfg
    assert load_config(["--loss_type", "sft"]).reference_free  # the registry decides, not a name list


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--betta", "0.1"], "unknown key 'betta'"),
        (["--beta", "high"], "beta: expected a number"),
        (["--batch_size", "2.5"], "batch_size: expected an integer"),
        (["--lora", "maybe"], "lora: expected true or false"),
        (["--loss_type", "kto"], "unknown loss_type 'kto'; valid loss types: aot, aot_unpaired"),
        (["--loss_type", "[sigmoid, 3]"], "loss_type: expected a name or a non-empty list of names"),
        (["--loss_weights", "[0.8, high]"], r"loss_weights\[1\]: expected a number"),
        (["--loss_type", "robust", "--label_smoothing", "0.5"], "label_smoothing"),
        (["--loss_type", "exo_pair"], "'exo_pair' needs 0 < label_smoothing < 0.5"),
        (["--ld_alpha", "0.5", "--average_log_prob"], "ld_alpha: LD-DPO weights summed"),
        (["--ld_alpha", "0.5", "--reference", "precomputed"], "ld_alpha: precomputed reference"),
        (["--beta", "0"], "beta: must be > 0"),
        (["--max_steps", "0"], "max_steps"),
        (["--reference", "adapters_disabled"], "needs --lora"),
        (["positional"], "unexpected argument"),
        (["--beta"], "--beta needs a value"),
        (["--max_logratio", "0"], "max_logratio: must be > 0"),
        (["--max_kl", "10"], "unknown key 'max_kl'"),  # renamed: the metric it bounded was never a KL
    ],
)
def test_errors_name_the_key(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_yaml_errors_name_the_key_and_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("beta: 0.1\nwarmup: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key 'warmup' in .*bad.yaml"):
        load_config(["--config", str(recipe)])
    recipe.write_text("batch_size: four\n")
    with pytest.raises(ConfigError, match="batch_size: expected an integer, got 'four'"):
        load_config(["--config", str(recipe)])
    recipe.write_text("lora: 'yes'\n")  # YAML strings are not booleans: only true/false
    with pytest.raises(ConfigError, match="lora: expected true or false"):
        load_config(["--config", str(recipe)])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--config", str(tmp_path / "missing.yaml")])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["--beta", "0.3", "--lora", "--lora_target_modules", "q_proj"])
    save_config(cfg, tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["beta"] == 0.3 and written["lora_target_modules"] == ["q_proj"]
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(["--config", str(recipe)])
    assert isinstance(cfg, TrainConfig)
    raw = yaml.safe_load(recipe.read_text())
    for key, value in raw.items():  # each key in the file took effect
        got = getattr(cfg, key)
        assert got == value or (isinstance(value, (int, float)) and float(got) == float(value)), key


def test_beta_presets_match_the_tutorial():
    presets = {
        name: load_config(["--config", str(ROOT / "recipes" / f"beta_{name}.yaml")]).beta
        for name in ("conservative", "moderate", "aggressive")
    }
    assert presets == {"conservative": 0.01, "moderate": 0.1, "aggressive": 0.5}
