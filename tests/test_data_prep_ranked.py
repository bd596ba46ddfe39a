"""data_prep on records with k scored answers (data_prep/ranked.py): both layouts, scores and ranks, message lists,
UltraFeedback's raw completions with --score_field, the shards' columns against tokenizing each answer by hand,
pairwise data written exactly as before, mixed inputs, per-answer truncation, and the skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import PreTrainedTokenizerFast

from data_prep.prepare import main
from dpo.contract import split_sha256

RANKED = [
    {"prompt": "The answer is", "responses": [" yes", " no", " maybe so", " hello"], "scores": [2.5, 0, 1, 0]},
    {"prompt": "Say hello", "responses": [" world", " there", " again"], "ranks": [3, 1, 2]},
    {"prompt": [{"role": "user", "content": "What is two plus two?"}],
     "responses": [[{"role": "assistant", "content": "four"}], "I do not know"], "scores": [1, 0]},
]
ULTRAFEEDBACK = [
    {"instruction": "The answer is", "completions": [
        {"response": " yes", "overall_score": 7.5, "fine-grained_score": 2.0},
        {"response": " no", "overall_score": 3.0, "fine-grained_score": 4.0},
        {"response": " maybe", "overall_score": 5.0, "fine-grained_score": 1.0}]},
    {"instruction": "Say hello", "completions": [  # all tied on overall_score: skipped unless another field
        {"response": " world", "overall_score": 5, "fine-grained_score": 1.0},
        {"response": " there", "overall_score": 5, "fine-grained_score": 3.5}]},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def prep(tokenizer_dir: Path, output: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> dict:
    argv = [arg for path in inputs for arg in ("--input", str(path))]
    assert main([*argv, "--tokenizer", str(tokenizer_dir), "--output", str(output), *extra]) == 0
    return json.loads((output / "prep_report.json").read_text())


def by_hand(tokenizer: PreTrainedTokenizerFast, prompt, answer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) as data_prep's rules make them for one answer: BOS + the prompt, then the answer
    ending in one EOS (the prompt is the shared prefix of the prompt's and the full text's encodings)."""
    if isinstance(prompt, str):
        prompt_text, full = prompt, prompt + answer
    else:
        turns = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(prompt + turns, tokenize=False).rstrip()
        full = full if full.endswith(tokenizer.eos_token) else tokenizer.apply_chat_template(prompt + turns,
                                                                                             tokenize=False)
    p = tokenizer(prompt_text, add_special_tokens=False).input_ids
    f = tokenizer(full, add_special_tokens=False).input_ids
    assert f[:len(p)] == p
    answer_ids = f[len(p):]
    while answer_ids and answer_ids[-1] == tokenizer.eos_token_id:
        answer_ids = answer_ids[:-1]
    return [tokenizer.bos_token_id] + p, answer_ids + [tokenizer.eos_token_id]


def test_ranked_records_round_trip(tokenizer, tokenizer_dir, tmp_path):
    report = prep(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", RANKED))
    data = load_from_disk(str(tmp_path / "out" / "train"))
    assert set(data.column_names) == {"prompt_ids", "chosen_ids", "rejected_ids", "source_index", "responses_ids",
                                      "scores"}
    assert report["columns"][-2:] == ["responses_ids", "scores"] and report["answers_per_prompt"] == {"2": 1, "3": 1,
                                                                                                      "4": 1}
    assert data["scores"] == [[2.5, 0.0, 1.0, 0.0], [-3.0, -1.0, -2.0], [1.0, 0.0]]  # ranks: score = -rank
    for row, record in zip(data, RANKED):
        answers = record["responses"]
        expected = [by_hand(tokenizer, record["prompt"], a) for a in answers]
        assert row["prompt_ids"] == expected[0][0]
        assert row["responses_ids"] == [ids for _, ids in expected]
        best = max(range(len(row["scores"])), key=lambda i: (row["scores"][i], -i))
        worst = max(range(len(row["scores"])), key=lambda i: (-row["scores"][i], i))  # the last of tied worst
        assert (row["chosen_ids"], row["rejected_ids"]) == (row["responses_ids"][best], row["responses_ids"][worst])
    assert data[0]["rejected_ids"] == expected_ids(tokenizer, " hello")


def expected_ids(tokenizer, answer: str) -> list[int]:
    return by_hand(tokenizer, "The answer is", answer)[1]


@pytest.mark.parametrize("field,kept", [("overall_score", 1), ("fine-grained_score", 2)])
def test_ultrafeedback_completions_and_score_field(tokenizer_dir, tmp_path, field, kept):
    report = prep(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK),
                  extra=("--score_field", field))
    data = load_from_disk(str(tmp_path / "out" / "train"))
    assert len(data) == kept and report["format"][str(tmp_path / "uf.jsonl")] == "ranked"
    assert data[0]["scores"] == [[7.5, 3.0, 5.0], [2.0, 4.0, 1.0]][kept - 1]
    skipped = {k: v for k, v in report["skipped"].items() if v}
    assert skipped == ({"all_tied": 1} if kept == 1 else {})
    if kept == 1:
        assert report["skipped_examples"]["all_tied"] == [f"{tmp_path / 'uf.jsonl'}:2"]


def test_pairwise_data_is_written_as_before(tokenizer_dir, tmp_path):
    pairs = [{"prompt": "The answer is", "chosen": " yes", "rejected": " no"}]
    report = prep(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "p.jsonl", pairs))
    data = load_from_disk(str(tmp_path / "out" / "train"))
    assert data.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "source_index"]
    assert "answers_per_prompt" not in report


def test_a_pair_beside_ranked_records_becomes_two_answers(tokenizer_dir, tmp_path):
    pair = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hello", "chosen": " world", "rejected": " there"}])
    prep(tokenizer_dir, tmp_path / "out", pair, write_jsonl(tmp_path / "r.jsonl", RANKED[:1]))
    data = load_from_disk(str(tmp_path / "out" / "train"))
    assert data[0]["responses_ids"] == [data[0]["chosen_ids"], data[0]["rejected_ids"]]
    assert data[0]["scores"] == [1.0, 0.0]


def test_each_answer_is_truncated_alike(tokenizer_dir, tmp_path):
    long = {"prompt": "The answer is", "responses": [" yes", " hello world hello there hello again", " no"],
            "scores": [1, 2, 0]}
    report = prep(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", [long]),
                  extra=("--max_length", "7", "--max_prompt_length", "4"))
    row = load_from_disk(str(tmp_path / "out" / "train"))[0]
    assert report["truncated_pairs"] == 1
    budget = 7 - len(row["prompt_ids"])
    assert [len(a) for a in row["responses_ids"]][1] == budget and row["responses_ids"][1][-1] == 2  # EOS kept
    assert max(len(row["prompt_ids"]) + len(a) for a in row["responses_ids"]) <= 7


def test_bad_ranked_records_are_counted_never_a_crash(tokenizer_dir, tmp_path):
    bad = [
        {"prompt": "a", "responses": [" b"], "scores": [1]},  # too_few_responses
        {"prompt": "a", "responses": [" b", " c"], "scores": [1, 1]},  # all_tied
        {"prompt": "a", "responses": [" b", " c"], "scores": [1, None]},  # bad_score
        {"prompt": "a", "responses": [" b", " c"], "scores": [1, "x"]},  # bad_score
        {"prompt": "a", "responses": [" b", " c"]},  # missing_field
        {"prompt": "a", "responses": [" b", " c"], "scores": [1]},  # wrong_type: lengths differ
        {"prompt": "a", "responses": [" b", ""], "scores": [1, 0]},  # empty_response
        {"prompt": "a", "responses": [" b", " b"], "scores": [1, 0]},  # chosen_equals_rejected
        {"instruction": "a", "completions": [{"response": " b"}, {"response": " c", "overall_score": 1}]},
        {"prompt": "a", "responses": "not a list", "scores": [1]},  # wrong_type
    ]
    good = RANKED[0]
    report = prep(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", [good, *bad]))
    counts = {k: v for k, v in report["skipped"].items() if v}
    assert counts == {"too_few_responses": 1, "all_tied": 1, "bad_score": 3, "missing_field": 1, "wrong_type": 2,
                      "empty_response": 1, "chosen_equals_rejected": 1}
    assert report["skipped_examples"]["bad_score"] == [f"{tmp_path / 'r.jsonl'}:{n}" for n in (4, 5, 10)]
    assert report["records_read"] == 11 and report["pairs_written"]["train"] == 1


def test_the_contract_hash_sees_every_answer(tokenizer_dir, tmp_path):
    prep(tokenizer_dir, tmp_path / "out", write_jsonl(tmp_path / "r.jsonl", RANKED))
    data = load_from_disk(str(tmp_path / "out" / "train"))
    base = split_sha256(data)
    middle = data.map(lambda row: {"responses_ids": [row["responses_ids"][0], row["responses_ids"][0][:1] + [2]]
                                   + row["responses_ids"][2:]})
    rescored = data.map(lambda row: {"scores": [s * 2 for s in row["scores"]]})
    assert len({base, split_sha256(middle), split_sha256(rescored)}) == 3


def test_ultrafeedback_as_a_parquet_table(tokenizer_dir, tmp_path):
    """A table of raw UltraFeedback rows (completions as a list of structs, extra columns) reads like the JSON."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [dict(r, source="evol", models=["a", "b"]) for r in ULTRAFEEDBACK]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    report = prep(tokenizer_dir, tmp_path / "out", tmp_path / "uf.parquet",
                  extra=("--score_field", "fine-grained_score"))
    data = load_from_disk(str(tmp_path / "out" / "train"))
    json_report = prep(tokenizer_dir, tmp_path / "out_json", write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK),
                       extra=("--score_field", "fine-grained_score"))
    assert data.to_dict() == load_from_disk(str(tmp_path / "out_json" / "train")).to_dict()
    assert report["pairs_written"] == json_report["pairs_written"] == {"train": 2, "eval": 0}
