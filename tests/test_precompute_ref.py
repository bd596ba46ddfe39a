"""dpo/precompute_ref.py: stored reference log-probs equal the on-the-fly reference, the shards are replaced whole,
a fingerprint mismatch is refused (or, under `auto`, not used), and training on them never loads a model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from tolerance import assert_reordered_close, batch_terms, model_terms
from transformers import AutoConfig

from builders import accelerator, frozen_copy_logps, make_data_dir, make_model_dir, make_tokenizer, prepared, restamp
from dpo.atomic import is_staging_name
from dpo.config import TrainConfig, load_config
from dpo.contract import REF_COLUMNS, TOKEN_COLUMNS, split_sha256
from dpo.data import collate_packed, collate_padded, load_split
from dpo.metrics import PAIR_METRICS, read_metrics
from dpo.precompute_ref import main, precompute
from dpo.reference import (
    FINGERPRINT_FILE,
    build_reference,
    check_precomputed,
    precomputed_mismatch,
    resolve_reference_kind,
)
from dpo.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute_inputs")
    tokenizer = make_tokenizer()
    model_dir = make_model_dir(root / "model", tokenizer, seed=0)
    other_model = make_model_dir(root / "other_model", tokenizer, seed=1)
    data_dir = make_data_dir(root / "data", tokenizer, n_train=16, n_eval=5, seed=0)
    # Two shards, so the rewrite must keep the count.
    datasets.load_from_disk(str(data_dir / "train")).save_to_disk(str(root / "train_2_shards"), num_shards=2)
    shutil.rmtree(data_dir / "train")
    shutil.move(root / "train_2_shards", data_dir / "train")
    precomputed = root / "precomputed"
    shutil.copytree(data_dir, precomputed)
    precompute(config(str(model_dir), str(precomputed), batch_size=3), ["train", "eval"])
    return {"model": str(model_dir), "other_model": str(other_model), "data": str(data_dir),
            "precomputed": str(precomputed), "pad": tokenizer.pad_token_id}


def config(model: str, data: str, **overrides) -> TrainConfig:
    return TrainConfig(**{"model_path": model, "data_path": data, **overrides})


def forward_terms(model_dir: str, split) -> int:
    """`model_terms` of a no-grad forward (no weight gradient sums positions) over rows as long as the split's
    longest pair, whatever batches and layouts each side used."""
    lengths = zip(split["prompt_ids"], split["chosen_ids"], split["rejected_ids"])
    longest = max(len(p) + len(c) + len(r) for p, c, r in lengths)
    return model_terms(AutoConfig.from_pretrained(model_dir), positions=0, row_length=longest)


def copy_of(inputs, key: str, tmp_path: Path) -> str:
    return str(shutil.copytree(inputs[key], tmp_path / key))


@pytest.mark.parametrize("average", [False, True])
def test_precomputed_equal_the_on_the_fly_reference(inputs, tmp_path, average):
    data = inputs["precomputed"] if not average else copy_of(inputs, "data", tmp_path)
    cfg = config(inputs["model"], data, average_log_prob=average)
    if average:
        assert main(["--model_path", inputs["model"], "--data_path", data, "--average_log_prob", "true",
                     "--batch_size", "5"]) == 0
    reference = build_reference("model", cfg, accelerator())
    for split in ("train", "eval"):
        dataset = load_split(data, split)
        pairs = list(dataset)
        # Other batches and layouts than precomputing used: the values are per pair, whatever the batch.
        for collate in (lambda p: collate_padded(p, pad_token_id=inputs["pad"]),
                        lambda p: collate_packed(p, pad_token_id=inputs["pad"], max_tokens_per_row=64)):
            for start in range(0, len(pairs), 4):
                batch = collate(pairs[start:start + 4])
                ref_chosen, ref_rejected = frozen_copy_logps(reference, batch)
                terms = batch_terms(reference.model, batch)
                assert_reordered_close(batch.ref_chosen_logps, ref_chosen, terms=terms, msg="chosen")
                assert_reordered_close(batch.ref_rejected_logps, ref_rejected, terms=terms, msg="rejected")
        check_precomputed(cfg, prepared(cfg), split)


def test_shards_are_replaced_whole_with_the_token_columns_unchanged(inputs):
    for split in ("train", "eval"):
        before, after = load_split(inputs["data"], split), load_split(inputs["precomputed"], split)
        assert after.column_names == list(TOKEN_COLUMNS) + list(REF_COLUMNS)
        for name in TOKEN_COLUMNS:
            assert after[name] == before[name]
        assert split_sha256(after) == split_sha256(before)
        fingerprint = json.loads((Path(inputs["precomputed"]) / split / FINGERPRINT_FILE).read_text())
        assert fingerprint["num_pairs"] == len(before) and fingerprint["average_log_prob"] is False
        assert fingerprint["dtype"] == "float32" and fingerprint["mixed_precision"] == "no"
    assert len(list((Path(inputs["precomputed"]) / "train").glob("data-*.arrow"))) == 2
    assert not [p.name for p in Path(inputs["precomputed"]).iterdir() if is_staging_name(p.name)]


def change_one_pair(data_dir: str, *, restamped: bool = True) -> None:
    """Edit a token of the train split but keep its reference columns and fingerprint (a stale precompute).
    `restamped`: prep_report.json records the edited data, as a new data_prep run would; otherwise it still
    records the original (the data changed behind data_prep's back)."""
    split_dir = Path(data_dir) / "train"
    original = datasets.load_from_disk(str(split_dir))
    rows = original.to_list()
    rows[3]["rejected_ids"] = rows[3]["rejected_ids"][::-1]
    fingerprint = (split_dir / FINGERPRINT_FILE).read_text()
    edited = split_dir.with_name("edited")
    datasets.Dataset.from_list(rows, features=original.features).save_to_disk(str(edited))
    shutil.rmtree(split_dir)
    edited.rename(split_dir)
    (split_dir / FINGERPRINT_FILE).write_text(fingerprint)
    if restamped:
        restamp(Path(data_dir))


@pytest.mark.parametrize("change, message", [
    ("model", "reference model weights"),
    ("ref_model", "reference model weights"),
    ("average_log_prob", "average_log_prob"),
    ("mixed_precision", "mixed_precision"),
    ("data", "token columns"),
    ("fingerprint_removed", "is missing"),
])
def test_a_fingerprint_mismatch_is_refused(inputs, tmp_path, capsys, change, message):
    data = copy_of(inputs, "precomputed", tmp_path)
    overrides = {
        "model": {"model_path": inputs["other_model"]},
        "ref_model": {"ref_model_path": inputs["other_model"]},
        "average_log_prob": {"average_log_prob": True},
        "mixed_precision": {"mixed_precision": "bf16"},
    }.get(change, {})
    if change == "data":
        change_one_pair(data)
    if change == "fingerprint_removed":
        (Path(data) / "train" / FINGERPRINT_FILE).unlink()
    cfg = config(inputs["model"], data, **{"reference": "precomputed", **overrides})
    with pytest.raises(ValueError, match=message) as refused:
        check_precomputed(cfg, prepared(cfg), "train")
    assert "python -m dpo.precompute_ref" in str(refused.value)
    with pytest.raises(ValueError, match=message):
        resolve_reference_kind(cfg, prepared(cfg))
    # auto never uses them either: it says why and computes the reference on the fly.
    auto = config(inputs["model"], data, **overrides)
    messages: list[str] = []
    assert resolve_reference_kind(auto, prepared(auto), log=messages.append) == "model"
    assert len(messages) == 1 and message in messages[0]


def test_auto_uses_matching_precomputed_and_needs_every_split(inputs, tmp_path):
    for lora in (False, True):  # matching stored values skip the reference forward, with LoRA too
        cfg = config(inputs["model"], inputs["precomputed"], lora=lora)
        assert resolve_reference_kind(cfg, prepared(cfg)) == "precomputed"
    data = copy_of(inputs, "data", tmp_path)
    assert main(["--model_path", inputs["model"], "--data_path", data, "--splits", "train"]) == 0
    cfg = config(inputs["model"], data)
    assert precomputed_mismatch(cfg, prepared(cfg), "train") is None
    messages: list[str] = []
    kind = resolve_reference_kind(config(inputs["model"], data, lora=True), prepared(cfg), log=messages.append)
    assert kind == "adapters_disabled" and "eval" in messages[0]
    with pytest.raises(ValueError, match="eval has no ref_chosen_logps"):
        resolve_reference_kind(config(inputs["model"], data, reference="precomputed"), prepared(cfg))


def test_data_changed_behind_the_reports_back_is_refused_before_any_fingerprint(inputs, tmp_path):
    """Tokens edited after data_prep (the report not rewritten): training's contract check refuses the data
    itself, naming the split, whatever the reference; nothing is computed or trained."""
    data = copy_of(inputs, "precomputed", tmp_path)
    change_one_pair(data, restamped=False)
    for reference in ("precomputed", "model"):
        cfg = config(inputs["model"], data, reference=reference)
        with pytest.raises(ValueError, match="train: its token columns differ from prep_report.json"):
            prepared(cfg)
    with pytest.raises(ValueError, match="differ from prep_report.json"):
        precompute(config(inputs["model"], data), ["train"])


def run(model: str, data: str, out: Path, *flags: str) -> list[dict]:
    train(load_config(["--model_path", model, "--data_path", data, "--output_dir", str(out), "--learning_rate",
                       "1e-2", "--max_steps", "3", "--seed", "5", *flags]))
    return read_metrics(out)


def test_training_with_precomputed_equals_a_frozen_copy_and_never_loads_a_model(inputs, tmp_path):
    """The reference model is given as a folder holding the same weights but no config.json: a precomputed run
    only fingerprints it (and succeeds), a frozen-copy run would have to load it (and fails)."""
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    for path in Path(inputs["model"]).glob("*.safetensors"):
        shutil.copy(path, weights_only / path.name)
    precomputed = run(inputs["model"], inputs["precomputed"], tmp_path / "pre", "--reference", "precomputed",
                      "--ref_model_path", str(weights_only))
    with pytest.raises((OSError, ValueError), match="config"):
        run(inputs["model"], inputs["precomputed"], tmp_path / "copy_fails", "--reference", "model",
            "--ref_model_path", str(weights_only))
    frozen_copy = run(inputs["model"], inputs["data"], tmp_path / "model", "--reference", "model")
    assert [(r["step"], r["split"]) for r in precomputed] == [(r["step"], r["split"]) for r in frozen_copy] == [
        (1, "train"), (2, "train"), (3, "train"), (3, "eval")]
    assert abs(frozen_copy[-1]["rewards/margins"]) > 1e-3  # the policy moved
    for ra, rb in zip(precomputed, frozen_copy):
        # Only the batches differ (precomputing groups pairs differently), so values agree to float32 rounding.
        # At step 1 the policy is the reference: margins are 0 up to that rounding and their sign is noise.
        for key in (k for k in PAIR_METRICS if not (k == "rewards/accuracies" and ra["step"] == 1)):
            assert ra[key] == pytest.approx(rb[key], abs=1e-5, rel=1e-5), (ra["step"], key)


@pytest.mark.distributed
def test_two_processes_write_each_pair_once_and_agree_with_one(inputs, tmp_path):
    data = copy_of(inputs, "data", tmp_path)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "accelerate_configs" / "ddp.yaml"), "--num_processes", "2", "--main_process_port",
                    "29541", "-m", "dpo.precompute_ref", "--model_path", inputs["model"], "--data_path", data,
                    "--batch_size", "3"], check=True, env=env, cwd=ROOT, timeout=300)
    for split in ("train", "eval"):
        two, one = load_split(data, split), load_split(inputs["precomputed"], split)
        terms = forward_terms(inputs["model"], one)
        for column in REF_COLUMNS:
            assert_reordered_close(torch.tensor(two[column]), torch.tensor(one[column]), terms=terms, msg=column)
        fingerprint = json.loads((Path(data) / split / FINGERPRINT_FILE).read_text())
        assert fingerprint["num_processes"] == 2
    cfg = config(inputs["model"], data)
    check_precomputed(cfg, prepared(cfg), "train")


@pytest.mark.slow  # FlexAttention compiles its CPU kernels for each shape (~10 s each)
def test_precompute_with_flex_attention_on_a_cpu_equals_the_dense_path(inputs, tmp_path, capsys):
    """`--attn_implementation flex_attention` serves precompute_ref's no-grad forwards on a CPU: compiled kernels and
    block masks, values equal to those precomputed with sdpa and dense masks within reordering (tests/tolerance.py);
    the log names it."""
    data = copy_of(inputs, "data", tmp_path)
    assert main(["--model_path", inputs["model"], "--data_path", data, "--batch_size", "3",
                 "--attn_implementation", "flex_attention"]) == 0
    assert "on flex_attention" in capsys.readouterr().out
    for split in ("train", "eval"):
        flex, dense = load_split(data, split), load_split(inputs["precomputed"], split)
        terms = forward_terms(inputs["model"], dense)
        for column in REF_COLUMNS:
            assert_reordered_close(torch.tensor(flex[column]), torch.tensor(dense[column]), terms=terms, msg=column)
