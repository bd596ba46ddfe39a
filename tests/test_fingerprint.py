"""dpo/fingerprint.py and the model side of dpo/contract.py: fingerprints cover every weight format (an SFT adapter
saved as adapter_model.bin too) and the tokenizer's chat template; training refuses data prepared with another
tokenizer or with ids outside the embedding matrix, accepts an embedding matrix larger than the tokenizer, and final/
ships the model's tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from builders import make_data_dir, make_model_dir, make_tokenizer, restamp
from demo.tiny import build_tokenizer
from dpo.config import TrainConfig
from dpo.contract import id_range, tokenizer_sha256
from dpo.fingerprint import adapter_sha256, weights_sha256
from dpo.reference import run_fingerprint
from dpo.train import main

FAST = ("--batch_size", "4", "--max_steps", "1", "--learning_rate", "1e-3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fingerprint_inputs")
    tokenizer = make_tokenizer()
    model = make_model_dir(root / "model", tokenizer, seed=0)
    data = make_data_dir(root / "data", tokenizer, n_train=8, n_eval=0, seed=0)
    return {"model": model, "data": data, "tokenizer": tokenizer, "root": root}


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpo.train:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_every_weight_format_is_fingerprinted(inputs, tmp_path):
    model = Path(shutil.copytree(inputs["model"], tmp_path / "model"))
    before = weights_sha256(model)
    (model / "pytorch_model.bin").write_bytes(b"weights in another format")
    assert weights_sha256(model) != before
    (model / "pytorch_model.bin").unlink()
    (model / "README.md").write_text("not a weight file")
    assert weights_sha256(model) == before


def test_an_adapter_saved_as_bin_changes_the_precomputed_fingerprint(inputs, tmp_path):
    """The issue's case: only *.safetensors and adapter_config.json were hashed, so a changed adapter_model.bin
    left a stale precomputed reference in use."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    torch.save({"lora_A": torch.ones(2, 2)}, adapter / "adapter_model.bin")
    cfg = TrainConfig(model_path=str(inputs["model"]), data_path=str(inputs["data"]), lora=True,
                      lora_adapter_path=str(adapter))
    first = run_fingerprint(cfg)
    torch.save({"lora_A": torch.full((2, 2), 2.0)}, adapter / "adapter_model.bin")
    second = run_fingerprint(cfg)
    assert first["adapter_sha256"] != second["adapter_sha256"]
    assert first["weights_sha256"] == second["weights_sha256"]
    assert adapter_sha256(adapter) == second["adapter_sha256"]


def test_tokenizer_hash_covers_the_chat_template(inputs):
    tokenizer = make_tokenizer()
    before = tokenizer_sha256(tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_sha256(tokenizer) != before
    assert tokenizer_sha256(make_tokenizer()) == before  # and it is a function of the tokenizer alone


def test_id_range_of_the_token_columns(inputs):
    rows = [{"prompt_ids": [3, 9], "chosen_ids": [4], "rejected_ids": [250, 2]},
            {"prompt_ids": [1], "chosen_ids": [7, 8], "rejected_ids": [5]}]
    assert id_range(datasets.Dataset.from_list(rows)) == (1, 250)


def data_with_tokenizer(inputs, tmp_path: Path, tokenizer) -> Path:
    data = Path(shutil.copytree(inputs["data"], tmp_path / "data"))
    shutil.rmtree(data / "tokenizer")
    tokenizer.save_pretrained(data / "tokenizer")
    restamp(data)  # prepared with that tokenizer: the report says so
    return data


def test_data_prepared_with_another_tokenizer_is_refused(inputs, tmp_path, capsys):
    """Another vocabulary whose ids still fit the embedding matrix: it would train on garbage without a word."""
    other = build_tokenizer([f"a different corpus {i} with other merges" for i in range(200)], vocab_size=300)
    data = data_with_tokenizer(inputs, tmp_path, other)
    out = tmp_path / "out"
    assert main(["--model_path", str(inputs["model"]), "--data_path", str(data), "--output_dir", str(out),
                 *FAST]) == 2
    line = error_line(capsys)
    assert "is not" in line and "tokenizer (its vocabulary or merges differ)" in line and "--tokenizer" in line
    assert not out.exists()


def test_other_special_ids_are_refused(inputs, tmp_path, capsys):
    tokenizer = make_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # the same vocabulary, another pad id
    data = data_with_tokenizer(inputs, tmp_path, tokenizer)
    assert main(["--model_path", str(inputs["model"]), "--data_path", str(data), "--output_dir",
                 str(tmp_path / "out"), *FAST]) == 2
    assert f"pad {tokenizer.eos_token_id} vs {inputs['tokenizer'].pad_token_id}" in error_line(capsys)


def test_ids_outside_the_embedding_matrix_are_refused(inputs, tmp_path, capsys):
    data = Path(shutil.copytree(inputs["data"], tmp_path / "data"))
    rows = datasets.load_from_disk(str(data / "train")).to_list()
    rows[3]["chosen_ids"] = rows[3]["chosen_ids"] + [len(inputs["tokenizer"]) + 5]
    shutil.rmtree(data / "train")
    datasets.Dataset.from_list(rows).save_to_disk(str(data / "train"))
    restamp(data)  # prepared that way: the report says so
    assert main(["--model_path", str(inputs["model"]), "--data_path", str(data), "--output_dir",
                 str(tmp_path / "out"), *FAST]) == 2
    line = error_line(capsys)
    assert f"train: token id {len(inputs['tokenizer']) + 5} does not fit" in line and "embedding matrix" in line


def test_a_padded_embedding_trains_and_final_ships_the_models_tokenizer(inputs, tmp_path, capsys):
    """Qwen-style: the embedding matrix is larger than the tokenizer. The data's tokenizer carries another chat
    template (data_prep --chat_template): allowed, said, and final/ keeps the model's own."""
    tokenizer = make_tokenizer()
    model = make_model_dir(tmp_path / "padded_model", tokenizer, seed=0)
    config = json.loads((model / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    padded = AutoModelForCausalLM.from_pretrained(model)
    padded.resize_token_embeddings(len(tokenizer) + 64)
    padded.save_pretrained(model)
    assert json.loads((model / "config.json").read_text())["vocab_size"] == config["vocab_size"] + 64
    data_tokenizer = make_tokenizer()
    data_tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    data = data_with_tokenizer(inputs, tmp_path, data_tokenizer)
    out = tmp_path / "out"
    assert main(["--model_path", str(model), "--data_path", str(data), "--output_dir", str(out), *FAST]) == 0
    assert "another chat template" in capsys.readouterr().out
    shipped = AutoTokenizer.from_pretrained(out / "final")
    assert shipped.chat_template == AutoTokenizer.from_pretrained(model).chat_template
    assert shipped.chat_template != data_tokenizer.chat_template
