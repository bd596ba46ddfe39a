"""LoRA end to end: the adapter in final/ reloads with PeftModel.from_pretrained, final_merged/ is a plain model equal
to base (+ SFT adapter) + adapter, and the shipped LoRA recipe trains. Oracle: peft applying the adapters at
forward time, unmerged, on an independently loaded base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lora_builders import make_sft_adapter
from peft import PeftModel
from tolerance import assert_reordered_close, model_terms
from transformers import AutoModelForCausalLM

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.config import load_config
from dpo.lora import load_trained_adapter
from dpo.models import load_causal_lm
from dpo.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_inputs")
    tokenizer = make_tokenizer()
    model_dir = make_model_dir(root / "model", tokenizer, seed=0)
    data_dir = make_data_dir(root / "data", tokenizer, n_train=8, n_eval=0, seed=0)
    adapter_dir = make_sft_adapter(model_dir, root / "sft_adapter", seed=2)
    input_ids = torch.tensor([tokenizer("what is 3 plus 4? the answer is 7.").input_ids])
    return {"model": str(model_dir), "data": str(data_dir), "sft": str(adapter_dir), "input_ids": input_ids}


def train_lora(inputs, out: Path, *flags: str):
    cfg = load_config(["--config", str(ROOT / "recipes" / "lora.yaml"), "--model_path", inputs["model"],
                       "--data_path", inputs["data"], "--output_dir", str(out), "--lora_r", "4",
                       "--learning_rate", "2e-2", "--max_steps", "2", "--warmup_ratio", "0", "--logging_steps", "1",
                       "--save_steps", "0", "--batch_size", "2", "--gradient_accumulation_steps", "1", *flags])
    train(cfg)
    return cfg


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, use_cache=False).logits


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor, model: torch.nn.Module, input_ids: torch.Tensor,
                       msg: str) -> None:
    """Merged weights (W + BA rounded once) against the adapter applied at forward time: the same function, its
    sums in another order (a forward only: no positions summed into a gradient)."""
    terms = model_terms(model.config, positions=0, row_length=input_ids.shape[-1])
    assert_reordered_close(actual, expected, terms=terms, msg=msg)


def test_adapter_saves_reloads_and_merges(inputs, tmp_path):
    cfg = train_lora(inputs, tmp_path / "run")
    final, merged_dir = tmp_path / "run" / "final", tmp_path / "run" / "final_merged"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert not (final / "model.safetensors").exists()  # the adapter only, not a copy of the base
    ids = inputs["input_ids"]
    reloaded = PeftModel.from_pretrained(load_causal_lm(inputs["model"]), str(final))
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    base_logits = logits(load_causal_lm(inputs["model"]), ids)
    expected = logits(reloaded, ids)
    assert (expected - base_logits).abs().max() > 1e-3  # the adapter learned something
    assert_same_logits(logits(merged, ids), expected, merged, ids, "merged")
    assert_same_logits(logits(load_trained_adapter(cfg, final), ids), expected, merged, ids, "reloaded adapter")
    assert (merged_dir / "tokenizer.json").is_file()
    assert not [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_starting_from_an_sft_adapter_merges_base_plus_sft_plus_dpo_adapter(inputs, tmp_path):
    cfg = train_lora(inputs, tmp_path / "run", "--lora_adapter_path", inputs["sft"])
    final, merged_dir = tmp_path / "run" / "final", tmp_path / "run" / "final_merged"
    ids = inputs["input_ids"]
    # Both adapters applied unmerged by peft on the bare base: base + SFT delta + DPO delta.
    stacked = PeftModel.from_pretrained(load_causal_lm(inputs["model"]), inputs["sft"], adapter_name="sft")
    stacked.load_adapter(str(final), adapter_name="dpo")
    stacked.base_model.set_adapter(["sft", "dpo"])
    expected = logits(stacked, ids)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir))
    assert_same_logits(logits(merged, ids), expected, merged, ids, "merged")
    assert_same_logits(logits(load_trained_adapter(cfg, final), ids), expected, merged, ids, "reloaded adapter")
    # The DPO adapter on the bare base is another model: final/ needs the SFT-merged base (load_trained_adapter).
    bare = logits(PeftModel.from_pretrained(load_causal_lm(inputs["model"]), str(final)), ids)
    assert (bare - expected).abs().max() > 1e-2
    # ... which final/ itself records, since peft's adapter_config names only the bare base
    note = json.loads((final / "dpo_base.json").read_text())
    assert note["model_path"] == inputs["model"] and note["merged_sft_adapter"] == inputs["sft"]


def test_lora_recipe_defaults(inputs):
    cfg = load_config(["--config", str(ROOT / "recipes" / "lora.yaml"), "--model_path", inputs["model"],
                       "--data_path", inputs["data"]])
    assert cfg.lora and cfg.merge_lora and cfg.reference == "auto" and cfg.lora_target_modules is None
