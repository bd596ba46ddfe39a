"""Frozen weights in 16 bits and QLoRA (dpo/precision.py, dpo/models.py): which weights load in which dtype, the
fingerprint of precomputed references, and 4-bit training on the CPU.

Oracles: hand-worked dtype rules and byte counts; for QLoRA, a plain (unquantised) model holding exactly the
dequantised weights - its log-probs and its LoRA gradients must be those of the quantised model (bitsandbytes
repacks 4-bit weights for a kernel without a backward after an eval forward on CPU, PERF_NOTES.md).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from builders import make_data_dir, make_model_dir, make_tokenizer, prepared
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.data import load_split
from dpo.layouts import make_collate
from dpo.logprobs import sequence_logps
from dpo.models import load_base_model, load_policy
from dpo.precision import frozen_weights_dtype, weights_label
from dpo.precompute_ref import precompute
from dpo.reference import check_precomputed, load_reference_model, make_reference, run_fingerprint

bnb = pytest.importorskip("bitsandbytes", reason="QLoRA tests need the qlora extra (pip install bitsandbytes)")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    tokenizer = make_tokenizer()
    model = make_model_dir(root / "model", tokenizer, seed=0, hidden_size=64)
    data = make_data_dir(root / "data", tokenizer, n_train=8, n_eval=4, seed=0)
    dataset = load_split(data, "train")
    batch = make_collate("packed", pad_token_id=0, max_tokens_per_row=2048, prefix_sharing=True)(
        [dataset[i] for i in range(4)], None)
    return {"model": str(model), "data": str(data), "batch": batch}


def config(inputs, **overrides) -> TrainConfig:
    return TrainConfig(**{"model_path": inputs["model"], "data_path": inputs["data"], "lora_dropout": 0.0,
                          **overrides})


def test_frozen_dtype_rules(inputs, tmp_path):
    assert frozen_weights_dtype(config(inputs)) == torch.float32  # auto without mixed precision
    assert frozen_weights_dtype(config(inputs, torch_dtype="bf16")) == torch.bfloat16
    assert frozen_weights_dtype(config(inputs, torch_dtype="fp16", mixed_precision="bf16")) == torch.float16
    # auto under mixed precision: the model's own recorded dtype (fp32 here), else the mixed-precision dtype.
    assert frozen_weights_dtype(config(inputs, mixed_precision="bf16")) == torch.float32
    saved = json.loads((Path(inputs["model"]) / "config.json").read_text())
    bf16_dir = tmp_path / "bf16_model"
    bf16_dir.mkdir()
    (bf16_dir / "config.json").write_text(json.dumps({**saved, "dtype": "bfloat16"}))
    assert frozen_weights_dtype(config(inputs, mixed_precision="fp16"), str(bf16_dir)) == torch.bfloat16
    (bf16_dir / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "dtype"}))
    assert frozen_weights_dtype(config(inputs, mixed_precision="fp16"), str(bf16_dir)) == torch.float16
    assert weights_label(config(inputs, lora=True, load_in_4bit=True, torch_dtype="bf16")) == "nf4/bfloat16"
    assert weights_label(config(inputs, lora=True, load_in_8bit=True)) == "int8/float32"


@pytest.mark.parametrize("overrides, message", [
    ({"load_in_4bit": True}, "add --lora"),
    ({"load_in_8bit": True}, "add --lora"),
    ({"lora": True, "load_in_4bit": True, "load_in_8bit": True}, "choose one"),
    ({"torch_dtype": "int4"}, "torch_dtype"),
])
def test_combinations_that_cannot_be_served_are_config_errors(inputs, overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(inputs, **overrides)
    flags = [f"--{k}={v}" for k, v in overrides.items()]
    with pytest.raises(ConfigError, match=message):
        load_config(["--model_path", inputs["model"], *flags])


def test_lora_base_and_reference_copy_in_16_bits_adapters_and_full_finetune_in_fp32(inputs):
    lora = load_policy(config(inputs, lora=True, torch_dtype="bf16"))
    frozen = {p.dtype for p in lora.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in lora.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    full_cfg = config(inputs, torch_dtype="bf16")
    assert {p.dtype for p in load_policy(full_cfg).parameters()} == {torch.float32}  # master weights
    assert {p.dtype for p in load_reference_model(full_cfg).parameters()} == {torch.bfloat16}
    # Weights memory: every frozen weight takes 2 bytes instead of 4 (hand count from the parameter numbers).
    fp32 = load_policy(config(inputs, lora=True))
    frozen_bytes = sum(p.numel() * p.element_size() for p in lora.parameters() if not p.requires_grad)
    frozen_fp32 = sum(p.numel() * p.element_size() for p in fp32.parameters() if not p.requires_grad)
    assert frozen_bytes * 2 == frozen_fp32
    # The same function: bf16 log-probs within bf16 rounding of fp32's, and not equal (it really is bf16).
    with torch.no_grad():
        want = sequence_logps(fp32, inputs["batch"]).chosen_logps
        got = sequence_logps(lora, inputs["batch"]).chosen_logps
    assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()


def test_fingerprint_records_the_effective_weights_dtype(inputs):
    assert run_fingerprint(config(inputs))["dtype"] == "float32"
    assert run_fingerprint(config(inputs, torch_dtype="bf16"))["dtype"] == "bfloat16"
    qlora = config(inputs, lora=True, load_in_4bit=True, torch_dtype="bf16")
    assert run_fingerprint(qlora)["dtype"] == "nf4/bfloat16"


def test_precomputed_reference_from_another_dtype_is_refused(inputs, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(inputs["data"], data)
    cfg = config(inputs, data_path=str(data))
    precompute(cfg, ["train"])  # fp32 reference values
    check_precomputed(cfg, prepared(cfg), "train")  # same dtype: accepted
    qlora = config(inputs, data_path=str(data), lora=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="weights dtype: precomputed with 'float32', this run has 'nf4/float32'"):
        check_precomputed(qlora, prepared(qlora), "train")


def train_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`python -m dpo.train ARGS` in-process: its exit status and its stderr lines."""
    from accelerate.state import AcceleratorState

    from dpo.train import main

    try:
        code = main(args)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return code, capsys.readouterr().err.strip().splitlines()


def test_refusals_at_the_command_line_are_one_line_and_exit_2(inputs, tmp_path, capsys):
    """Full fine-tuning of 4-bit weights, and a precomputed reference from fp32 weights under an NF4 run: exit 2,
    one line naming the option and the fix, nothing written."""
    import shutil

    from dpo.precompute_ref import precompute

    out = tmp_path / "out"
    base = ["--model_path", inputs["model"], "--output_dir", str(out), "--max_steps", "1"]
    code, err = train_cli([*base, "--data_path", inputs["data"], "--load_in_4bit"], capsys)
    assert (code, len(err)) == (2, 1), err
    assert err[0].startswith("dpo.train: config error: load_in_4bit:") and "add --lora" in err[0]
    data = tmp_path / "data"
    shutil.copytree(inputs["data"], data)
    precompute(config(inputs, data_path=str(data)), ["train", "eval"])  # fp32 reference values
    capsys.readouterr()
    code, err = train_cli([*base, "--data_path", str(data), "--lora", "--load_in_4bit", "--reference",
                           "precomputed"], capsys)
    assert (code, len(err)) == (2, 1), err
    assert "weights dtype: precomputed with 'float32', this run has 'nf4/float32'" in err[0]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------- QLoRA


def dequantized_twin(inputs, policy):
    """A plain fp32 model holding the quantised base's dequantised weights, with the policy's adapter values."""
    from peft import get_peft_model

    base = load_base_model(inputs["model"], adapter_path=None, cfg=config(inputs, lora=True, load_in_4bit=True),
                           frozen=True).dequantize().float()
    assert not any("Linear4bit" in type(m).__name__ for m in base.modules())
    twin = get_peft_model(base, policy.peft_config["default"])
    adapters = {n: p for n, p in policy.named_parameters() if "lora_" in n}
    missing = twin.load_state_dict(adapters, strict=False)
    assert not missing.unexpected_keys
    return twin


def randomize_adapters(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_qlora_reference_is_the_quantised_base_and_gradients_equal_the_dequantised_twin(inputs):
    cfg = config(inputs, lora=True, load_in_4bit=True)
    policy = load_policy(cfg)
    assert sum("Linear4bit" in type(m).__name__ for m in policy.modules()) >= 14  # 7 linears x 2 layers, quantised
    # The guard: no 4-bit layer may repack for the backward-less CPU kernel (a no-op where the CPU lacks AVX512-BF16).
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in policy.modules())
    randomize_adapters(policy)  # a trained adapter, so adapters-on and adapters-off differ
    batch = inputs["batch"]
    # The adapters-disabled reference first: an eval forward without gradients (the repacking trap's trigger).
    ref_chosen, ref_rejected = make_reference("adapters_disabled", cfg, policy=policy).logps(batch)
    plain = load_base_model(inputs["model"], adapter_path=None, cfg=cfg, frozen=True).eval()
    with torch.no_grad():
        own = sequence_logps(plain, batch)
    torch.testing.assert_close(ref_chosen, own.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref_rejected, own.rejected_logps, rtol=1e-5, atol=1e-5)

    twin = dequantized_twin(inputs, policy)
    with torch.no_grad(), twin.disable_adapter():  # the twin's base is the quantised model exactly
        twin_ref = sequence_logps(twin, batch).chosen_logps
    torch.testing.assert_close(twin_ref, own.chosen_logps, rtol=1e-5, atol=1e-5)
    grads = {}
    for name, model in (("qlora", policy), ("twin", twin)):
        model.train()
        out = sequence_logps(model, batch)
        (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads["qlora"].keys() == grads["twin"].keys() and len(grads["qlora"]) >= 28
    for name, grad in grads["twin"].items():
        torch.testing.assert_close(grads["qlora"][name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(),
                                   msg=name)


def test_qlora_run_trains_and_final_reloads_on_the_quantised_base(inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo.lora import load_trained_adapter
    from dpo.train import train

    out = tmp_path / "qlora"
    cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out),
                       "--lora", "--load_in_4bit", "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "2e-2",
                       "--max_steps", "3", "--batch_size", "2", "--merge_lora"])
    train(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["split"] == "train" and r["step"] == 1)
    # Step 1: the fresh adapter is zero, so the policy is the quantised base and equals its reference.
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    batch = inputs["batch"]
    reloaded = load_trained_adapter(cfg, out / "final")
    assert any("Linear4bit" in type(m).__name__ for m in reloaded.modules())
    merged = AutoModelForCausalLM.from_pretrained(out / "final_merged", local_files_only=True, use_safetensors=True)
    assert not any("Linear4bit" in type(m).__name__ for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        on_quantised = sequence_logps(reloaded, batch)
        with reloaded.disable_adapter():
            base = sequence_logps(reloaded, batch)
        from_merged = sequence_logps(merged.eval(), batch)
    assert (on_quantised.chosen_logps - base.chosen_logps).abs().max() > 1e-3  # it trained
    torch.testing.assert_close(from_merged.chosen_logps, on_quantised.chosen_logps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(from_merged.rejected_logps, on_quantised.rejected_logps, rtol=1e-4, atol=1e-4)


def test_8bit_base_trains_lora(inputs):
    policy = load_policy(config(inputs, lora=True, load_in_8bit=True))
    assert any("Linear8bitLt" in type(m).__name__ for m in policy.modules())
    out = sequence_logps(policy.train(), inputs["batch"])
    out.chosen_logps.sum().backward()
    lora_b = [p.grad for n, p in policy.named_parameters() if "lora_B" in n]
    assert lora_b and all(g is not None and torch.isfinite(g).all() for g in lora_b)
    assert any(g.abs().sum() > 0 for g in lora_b)


@pytest.mark.distributed
@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantised_weights_under_zero3_are_refused_with_one_line(inputs, tmp_path, flag):
    """A real ZeRO-3 launch (one process) through the project's launcher (`./launch.sh train` runs it) with a
    quantised base: exit 2 and one line naming the option and the fix, no traceback, before any model loads."""
    import subprocess

    from tests.test_distributed import REPO, free_port, launch_cmd, launch_env

    cmd = launch_cmd("zero3", ["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir",
                               str(tmp_path / "out"), "--lora", flag, "--max_steps", "1"],
                     num_processes=1, port=free_port())
    cmd[cmd.index("accelerate.commands.launch")] = "dpo.launch"
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"dpo.train: config error: {flag[2:]}: DeepSpeed ZeRO-3 cannot partition "
                                f"bitsandbytes-quantised weights"), errors
    assert not (tmp_path / "out").exists()
