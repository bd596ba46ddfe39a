"""dpo/reference.py: the strategy decision, the adapters-disabled and frozen-copy references, and the SFT-adapter
base. Oracles: log-probs of independently loaded models (the bare base, base + SFT adapter through peft without
merging), and training trajectories of two strategies from the same starting weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lora_builders import make_sft_adapter
from peft import PeftModel
from tolerance import assert_reordered_close, batch_terms

from builders import accelerator, frozen_copy_logps, make_data_dir, make_model_dir, make_tokenizer, prepared
from dpo.config import TrainConfig, load_config
from dpo.data import collate_padded, load_split
from dpo.logprobs import sequence_logps
from dpo.metrics import PAIR_METRICS, read_metrics
from dpo.models import load_causal_lm, load_policy
from dpo.reference import build_reference, make_reference, resolve_reference_kind
from dpo.train import train


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference_inputs")
    tokenizer = make_tokenizer()
    model_dir = make_model_dir(root / "model", tokenizer, seed=0)
    data_dir = make_data_dir(root / "data", tokenizer, n_train=16, n_eval=4, seed=0)
    adapter_dir = make_sft_adapter(model_dir, root / "sft_adapter", seed=1)
    batch = collate_padded(list(load_split(data_dir, "train"))[:6], pad_token_id=tokenizer.pad_token_id)
    return {"model": str(model_dir), "data": str(data_dir), "sft": str(adapter_dir), "batch": batch}


def config(inputs, **overrides) -> TrainConfig:
    return TrainConfig(model_path=inputs["model"], data_path=inputs["data"], **overrides)


def perturb_lora(model: torch.nn.Module, *, seed: int) -> None:
    """Give the fresh adapter non-zero weights (its B starts at zero, so it would equal the base)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def base_plus_sft(inputs) -> torch.nn.Module:
    """Base + SFT adapter, applied by peft at forward time (not merged): independent of load_base_model."""
    return PeftModel.from_pretrained(load_causal_lm(inputs["model"]), inputs["sft"]).eval()


def test_adapters_disabled_equals_the_base_model(inputs):
    cfg = config(inputs, lora=True, lora_r=4)
    policy = load_policy(cfg)
    perturb_lora(policy, seed=3)
    policy.train()
    batch = inputs["batch"]
    ref_chosen, ref_rejected = make_reference("adapters_disabled", cfg, policy=policy).logps(batch)
    base_model = load_causal_lm(inputs["model"]).eval()
    base = sequence_logps(base_model, batch)
    terms = batch_terms(base_model, batch)
    assert_reordered_close(ref_chosen, base.chosen_logps, terms=terms, msg="chosen")
    assert_reordered_close(ref_rejected, base.rejected_logps, terms=terms, msg="rejected")
    # The adapters are back on afterwards, and they matter: the policy itself is a different model.
    assert policy.training
    adapted = sequence_logps(policy, batch)
    assert (adapted.chosen_logps - base.chosen_logps).abs().max() > 1e-2


def test_sft_adapter_is_part_of_the_reference_and_the_bare_base_differs(inputs):
    cfg = config(inputs, lora=True, lora_r=4, lora_adapter_path=inputs["sft"])
    batch = inputs["batch"]
    base = base_plus_sft(inputs)
    expected, terms = sequence_logps(base, batch), batch_terms(base, batch)
    policy = load_policy(cfg)
    perturb_lora(policy, seed=4)  # the fresh DPO adapter must not leak into the reference either
    by_strategy = {
        "adapters_disabled": make_reference("adapters_disabled", cfg, policy=policy).logps(batch),
        "model": frozen_copy_logps(build_reference("model", cfg, accelerator()), batch),
    }
    for kind, (ref_chosen, ref_rejected) in by_strategy.items():
        assert_reordered_close(ref_chosen, expected.chosen_logps, terms=terms, msg=kind)
        assert_reordered_close(ref_rejected, expected.rejected_logps, terms=terms, msg=kind)
    bare = sequence_logps(load_causal_lm(inputs["model"]).eval(), batch)
    assert (bare.chosen_logps - expected.chosen_logps).abs().min() > 1e-2  # every pair would get a wrong reference


def test_frozen_copy_is_frozen_in_the_policy_dtype(inputs):
    cfg = config(inputs)
    reference = build_reference("model", cfg, accelerator())
    policy = load_policy(cfg)
    assert {p.dtype for p in reference.model.parameters()} == {p.dtype for p in policy.parameters()}
    assert not reference.model.training
    assert not any(p.requires_grad for p in reference.model.parameters())
    ref_chosen, _ = frozen_copy_logps(reference, inputs["batch"])
    assert_reordered_close(ref_chosen, sequence_logps(policy, inputs["batch"]).chosen_logps,
                           terms=batch_terms(policy, inputs["batch"]), msg="frozen copy vs the policy")
    missing = config(inputs, ref_model_path=str(Path(inputs["model"]).parent / "no_such_model"))
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        build_reference("model", missing, accelerator())


@pytest.mark.parametrize("overrides, expected", [
    ({}, "model"),
    ({"lora": True}, "adapters_disabled"),
    ({"lora": True, "reference": "model"}, "model"),
    ({"loss_type": "simpo"}, "none"),
    ({"reference": "adapters_disabled", "lora": True}, "adapters_disabled"),
])
def test_auto_and_explicit_choices_without_precomputed_data(inputs, overrides, expected):
    cfg = config(inputs, **overrides)
    assert resolve_reference_kind(cfg, prepared(cfg)) == expected


def test_a_separate_reference_model_is_never_replaced_by_disabled_adapters(inputs, tmp_path):
    other = make_model_dir(tmp_path / "other", make_tokenizer(), seed=5)
    cfg = config(inputs, lora=True, ref_model_path=str(other))
    data = prepared(cfg)
    assert resolve_reference_kind(cfg, data) == "model"
    with pytest.raises(ValueError, match="ref_model_path"):
        resolve_reference_kind(config(inputs, lora=True, reference="adapters_disabled", ref_model_path=str(other)),
                               data)
    with pytest.raises(ValueError, match="precompute_ref"):
        resolve_reference_kind(config(inputs, reference="precomputed"), data)


def test_lora_training_is_the_same_with_disabled_adapters_or_a_frozen_copy(inputs, tmp_path):
    """Same starting weights (base + SFT adapter merged, the same fresh adapter by seed): the reference held as a
    frozen copy of the merged base or as the policy with adapters off gives the same first steps."""
    runs = {}
    for kind in ("adapters_disabled", "model"):
        cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir",
                           str(tmp_path / kind), "--lora", "--lora_r", "4", "--lora_adapter_path", inputs["sft"],
                           "--lora_dropout", "0", "--learning_rate", "1e-2", "--max_steps", "3", "--seed", "3",
                           "--reference", kind])
        train(cfg)
        runs[kind] = read_metrics(tmp_path / kind)
    a, b = runs["adapters_disabled"], runs["model"]
    assert [(r["step"], r["split"]) for r in a] == [(r["step"], r["split"]) for r in b] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert a[-1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    for ra, rb in zip(a, b):
        for key in PAIR_METRICS:
            assert ra[key] == pytest.approx(rb[key], abs=1e-5, rel=1e-5), (ra["step"], key)
