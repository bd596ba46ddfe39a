"""dpo/contract.py: data_prep and training compute the same hashes with the same functions, training refuses data
whose report, shards or tokenizer do not agree (one line, exit 2), and the hashes see what they must.

Oracles: the report written by a real `python -m data_prep` run, and a token-column hash recomputed here from the
rows as plain Python lists."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest

from builders import make_model_dir, make_tokenizer, prepared, restamp
from data_prep.prepare import main as prep_main
from dpo.config import TrainConfig
from dpo.contract import (
    REPORT_NAME,
    TOKEN_COLUMNS,
    check_data_contract,
    data_sha256,
    split_sha256,
    tokenizer_sha256,
)
from dpo.data import load_split
from dpo.train import main as train_main

FAST = ("--batch_size", "2", "--max_steps", "1", "--learning_rate", "1e-3")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A model and its tokenizer, and data prepared from JSONL by data_prep itself."""
    root = tmp_path_factory.mktemp("contract_inputs")
    model = make_model_dir(root / "model", make_tokenizer(), seed=0)
    records = [{"prompt": f"what is {a} plus {b}?", "chosen": f" {a + b}.", "rejected": f" {a + b + 1}."}
               for a in range(6) for b in range(3)]
    raw = root / "pairs.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = root / "data"
    assert prep_main(["--input", str(raw), "--tokenizer", str(model), "--output", str(data), "--eval_fraction",
                      "0.2", "--num_shards", "2"]) == 0
    return {"model": model, "data": data}


def config(inputs, data: Path | None = None) -> TrainConfig:
    return TrainConfig(model_path=str(inputs["model"]), data_path=str(data or inputs["data"]))


def copy_data(inputs, tmp_path: Path) -> Path:
    return Path(shutil.copytree(inputs["data"], tmp_path / "data"))


def naive_split_sha256(dataset: datasets.Dataset) -> str:
    """The token-column hash from the rows as Python lists: per column, sha256 of the row lengths and of all ids as
    little-endian int64, combined with the row count."""
    rows = dataset.to_list()
    digest = hashlib.sha256(str(len(rows)).encode())
    for name in TOKEN_COLUMNS:
        lengths = np.array([len(row[name]) for row in rows], dtype="<i8").tobytes()
        values = np.array([i for row in rows for i in row[name]], dtype="<i8").tobytes()
        digest.update(f"{name}:{hashlib.sha256(lengths).hexdigest()}:{hashlib.sha256(values).hexdigest()}".encode())
    return digest.hexdigest()


def report_of(data: Path) -> dict:
    return json.loads((data / REPORT_NAME).read_text())


def train_error(inputs, data: Path, tmp_path: Path, capsys) -> str:
    out = tmp_path / "out"
    assert train_main(["--model_path", str(inputs["model"]), "--data_path", str(data), "--output_dir", str(out),
                       *FAST]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dpo.train:")]
    assert len(lines) == 1, lines
    assert not out.exists()  # refused before anything was written
    return lines[0]


def test_data_prep_and_training_compute_the_same_hashes(inputs):
    report = report_of(inputs["data"])
    data = prepared(config(inputs))
    assert set(data.hashes) == {"train", "eval"} == set(report["data_hashes"])
    for split in ("train", "eval"):
        dataset = load_split(inputs["data"], split)
        assert len(dataset.data.column("prompt_ids").chunks) == 2  # two shards: the hash must not care
        assert data.hashes[split] == report["data_hashes"][split] == naive_split_sha256(dataset)
    assert report["data_hash"] == data_sha256(data.hashes)
    assert data.tokenizer_hash == report["tokenizer"]["hash"]
    assert data.tokenizer_hash == tokenizer_sha256(make_tokenizer())  # the model's own tokenizer, unchanged


def test_training_runs_on_data_prep_output(inputs, tmp_path):
    out = tmp_path / "out"
    assert train_main(["--model_path", str(inputs["model"]), "--data_path", str(inputs["data"]), "--output_dir",
                       str(out), *FAST]) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_changed_tokens_are_refused(inputs, tmp_path, capsys):
    data = copy_data(inputs, tmp_path)
    rows = load_split(data, "train").to_list()
    rows[0]["chosen_ids"] = rows[0]["chosen_ids"][:-2] + rows[0]["chosen_ids"][-1:]  # one id fewer, still ends in EOS
    shutil.rmtree(data / "train")
    datasets.Dataset.from_list(rows).save_to_disk(str(data / "train"))
    line = train_error(inputs, data, tmp_path, capsys)
    assert f"{data}/train: its token columns differ from {REPORT_NAME}" in line and "prepare it again" in line


def test_a_tampered_report_is_refused(inputs, tmp_path, capsys):
    data = copy_data(inputs, tmp_path)
    report = report_of(data)
    report["data_hashes"]["eval"] = "0" * 64
    (data / REPORT_NAME).write_text(json.dumps(report))
    assert f"{data}/eval: its token columns differ" in train_error(inputs, data, tmp_path, capsys)


def test_a_changed_chat_template_is_another_tokenizer(inputs, tmp_path, capsys):
    data = copy_data(inputs, tmp_path)
    tokenizer = make_tokenizer()
    assert tokenizer_sha256(tokenizer) == report_of(data)["tokenizer"]["hash"]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer_sha256(tokenizer) != report_of(data)["tokenizer"]["hash"]  # the template alone changes it
    shutil.rmtree(data / "tokenizer")
    tokenizer.save_pretrained(data / "tokenizer")
    line = train_error(inputs, data, tmp_path, capsys)
    assert f"{data}/tokenizer: not the tokenizer {REPORT_NAME} names" in line


@pytest.mark.parametrize("case, expected", [
    ("unreadable", f"{REPORT_NAME}: unreadable"),
    ("not_an_object", f"{REPORT_NAME}: not a data_prep report"),
    ("extra_split", "eval: not in prep_report.json"),
    ("missing_split", "eval: missing, but prep_report.json lists it"),
])
def test_data_that_the_report_does_not_describe_is_refused(inputs, tmp_path, capsys, case, expected):
    data = copy_data(inputs, tmp_path)
    report = report_of(data)
    if case == "not_an_object":
        (data / REPORT_NAME).write_text("[1, 2]")
    elif case == "unreadable":
        (data / REPORT_NAME).write_text("{not json")
    elif case == "extra_split":
        del report["data_hashes"]["eval"]
        (data / REPORT_NAME).write_text(json.dumps(report))
    elif case == "missing_split":
        shutil.rmtree(data / "eval")
    assert expected in train_error(inputs, data, tmp_path, capsys)


@pytest.mark.parametrize("case", ["no_report", "old_report", "no_report_no_tokenizer"])
def test_data_without_a_report_is_checked_against_the_model_and_says_so(inputs, tmp_path, capsys, case):
    """Arrow shards written by other means, or by a data_prep from before the hashes: trained on, with a note that
    nothing verified them against a report; the hashes are the same functions' (precomputed fingerprints agree)."""
    data = copy_data(inputs, tmp_path)
    report = report_of(data)
    if case == "old_report":
        del report["data_hashes"]
        (data / REPORT_NAME).write_text(json.dumps(report))
    else:
        (data / REPORT_NAME).unlink()
    if case == "no_report_no_tokenizer":
        shutil.rmtree(data / "tokenizer")
    notes = []
    checked = check_data_contract(config(inputs, data), {"train": load_split(data, "train"),
                                                         "eval": load_split(data, "eval")}, log=notes.append)
    assert checked.hashes == report_of(inputs["data"])["data_hashes"]
    assert checked.tokenizer_hash == tokenizer_sha256(make_tokenizer())
    assert len(notes) == 1 and "cannot be verified against what data_prep wrote" in notes[0], notes
    assert ("is missing" if case != "old_report" else "has no data_hashes") in notes[0]
    out = tmp_path / "out"
    assert train_main(["--model_path", str(inputs["model"]), "--data_path", str(data), "--output_dir", str(out),
                       *FAST]) == 0
    assert "cannot be verified against what data_prep wrote" in capsys.readouterr().out


def test_a_report_with_hashes_but_no_tokenizer_folder_is_refused(inputs, tmp_path, capsys):
    data = copy_data(inputs, tmp_path)
    shutil.rmtree(data / "tokenizer")
    assert "tokenizer: missing" in train_error(inputs, data, tmp_path, capsys)


def test_restamping_what_a_new_data_prep_run_would_write_is_accepted(inputs, tmp_path):
    data = copy_data(inputs, tmp_path)
    rows = load_split(data, "train").to_list()[:-1]
    shutil.rmtree(data / "train")
    datasets.Dataset.from_list(rows).save_to_disk(str(data / "train"))
    restamp(data)
    checked = prepared(config(inputs, data))
    assert checked.hashes["train"] == naive_split_sha256(load_split(data, "train"))
    assert checked.hashes["train"] != report_of(inputs["data"])["data_hashes"]["train"]


def test_split_hash_sees_the_boundary_between_prompt_and_answer():
    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 2]}]
    moved = [{"prompt_ids": [1, 5], "chosen_ids": [6, 7, 2], "rejected_ids": [8, 2]}]  # the same ids in order
    base = split_sha256(datasets.Dataset.from_list(rows))
    assert base == naive_split_sha256(datasets.Dataset.from_list(rows))
    assert base != split_sha256(datasets.Dataset.from_list(moved))
    shuffled = datasets.Dataset.from_list(rows + moved).select([1, 0])  # a view: hashed as it shows the rows
    assert split_sha256(shuffled) == naive_split_sha256(datasets.Dataset.from_list(moved + rows))
