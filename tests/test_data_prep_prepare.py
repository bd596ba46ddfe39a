"""data_prep.prepare: the CLI end to end, run in-process via main([...]) and once as `python -m data_prep`."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, load_from_disk
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import data_prep.prepare as prepare
from data_prep.formats import Reason
from data_prep.prepare import main, split_eval
from data_prep.tokenize import TokenizedPair
from dpo.contract import data_sha256, split_sha256, tokenizer_sha256

GOOD = {"prompt": "The answer is", "chosen": " yes", "rejected": " no"}
REPO = Path(__file__).resolve().parents[1]


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _run(tokenizer_dir: Path, output: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> int:
    argv = [arg for path in inputs for arg in ("--input", str(path))]
    return main([*argv, "--tokenizer", str(tokenizer_dir), "--output", str(output), *extra])


def _report(output: Path) -> dict:
    return json.loads((output / "prep_report.json").read_text())


def _assert_nothing_lost(report: dict) -> None:
    written = sum(report["pairs_written"].values())
    assert report["records_read"] == written + sum(report["skipped"].values())


def _many(count: int) -> list[dict]:
    """`count` distinct explicit pairs with distinct prompts."""
    return [
        {"prompt": f"Question {n}: yes or no?", "chosen": f" yes {n}", "rejected": f" no {n}"}
        for n in range(count)
    ]


# ---------------------------------------------------------------- all three shapes, round trip


def test_all_three_shapes_round_trip_through_load_from_disk(
    tokenizer: PreTrainedTokenizerFast, tokenizer_dir: Path, tmp_path: Path
) -> None:
    explicit = _write_jsonl(tmp_path / "explicit.jsonl", [GOOD])
    implicit = tmp_path / "implicit.json"
    implicit.write_text(
        json.dumps(
            [{"chosen": "\n\nHuman: Hi\n\nAssistant: yes", "rejected": "\n\nHuman: Hi\n\nAssistant: no"}]
        )
    )
    messages = [{"role": "user", "content": "Hi"}]
    conversational = tmp_path / "chat.jsonl.gz"
    conversational.write_bytes(
        gzip.compress(
            json.dumps(
                {
                    "chosen": messages + [{"role": "assistant", "content": "yes"}],
                    "rejected": messages + [{"role": "assistant", "content": "no"}],
                }
            ).encode()
        )
    )
    output = tmp_path / "out"
    assert _run(tokenizer_dir, output, explicit, implicit, conversational) == 0

    report = _report(output)
    assert report["format"] == {
        str(explicit): "explicit",
        str(implicit): "implicit",
        str(conversational): "conversational",
    }
    assert report["records_read"] == 3 and report["pairs_written"] == {"train": 3, "eval": 0}
    assert (report["pad_token_id"], report["bos_token_id"], report["eos_token_id"]) == (0, 1, 2)
    assert report["max_length"] == 1024 and report["max_prompt_length"] == 512

    train = load_from_disk(str(output / "train"))
    assert train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids", "source_index"]
    assert train.features["prompt_ids"].feature.dtype == "int32"
    rows = train.to_list()
    encode = tokenizer.encode  # adds BOS, no EOS
    assert rows[0] == {
        "prompt_ids": encode("The answer is"),
        "chosen_ids": encode(" yes", add_special_tokens=False) + [2],
        "rejected_ids": encode(" no", add_special_tokens=False) + [2],
        "source_index": 0,
    }
    assert rows[1]["prompt_ids"] == encode("\n\nHuman: Hi\n\nAssistant:")
    assert rows[1]["chosen_ids"] == encode(" yes", add_special_tokens=False) + [2]
    assert rows[2]["prompt_ids"] == encode("<|user|>\nHi</s>\n<|assistant|>\n")
    assert tokenizer.convert_ids_to_tokens(rows[2]["chosen_ids"]) == ["yes", "</s>"]
    assert [row["source_index"] for row in rows] == [0, 1, 2]

    saved = AutoTokenizer.from_pretrained(str(output / "tokenizer"))
    assert report["tokenizer"]["hash"] == tokenizer_sha256(saved) == tokenizer_sha256(tokenizer)
    assert report["data_hashes"] == {"train": split_sha256(train)}
    assert report["data_hash"] == data_sha256({"train": split_sha256(train)})
    # Token-length statistics by hand. Prompts: 4 tokens (explicit), 12 (implicit: <s> Ċ Ċ Human : Ġ H i Ċ Ċ
    # Assistant :) and 9 (chat: <s> <|user|> Ċ H i </s> Ċ <|assistant|> Ċ): mean 25/3, p95 = 9 + 0.9 * (12 - 9).
    assert [len(row["prompt_ids"]) for row in rows] == [4, 12, 9]
    assert report["token_lengths"]["prompt"] == {"mean": 8.33, "p50": 9.0, "p95": 11.7, "max": 12}
    assert report["token_lengths"]["response"] == {"mean": 2.0, "p50": 2.0, "p95": 2.0, "max": 2}


def test_pad_token_is_eos_when_the_tokenizer_has_none(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    no_pad = AutoTokenizer.from_pretrained(str(_saved(tokenizer, tmp_path / "tok")))
    no_pad.pad_token = None
    no_pad.save_pretrained(str(tmp_path / "tok_no_pad"))
    output = tmp_path / "out"
    assert _run(tmp_path / "tok_no_pad", output, _write_jsonl(tmp_path / "a.jsonl", [GOOD])) == 0
    report = _report(output)
    assert report["pad_token_id"] == report["eos_token_id"] == 2
    assert report["tokenizer"]["pad_token_set_to_eos"] is True
    assert AutoTokenizer.from_pretrained(str(output / "tokenizer")).pad_token == "</s>"


def _saved(tokenizer: PreTrainedTokenizerFast, path: Path) -> Path:
    tokenizer.save_pretrained(str(path))
    return path


def test_tokenizer_without_bos(tokenizer_no_bos_dir: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    assert _run(tokenizer_no_bos_dir, output, _write_jsonl(tmp_path / "a.jsonl", [GOOD])) == 0
    row = load_from_disk(str(output / "train"))[0]
    assert 1 not in row["prompt_ids"] and row["chosen_ids"][-1] == 2 and row["chosen_ids"].count(2) == 1
    assert _report(output)["prompt_starts_with_bos"] is False


def test_chat_template_file_overrides_and_no_template_is_an_error(
    tokenizer: PreTrainedTokenizerFast, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bare = AutoTokenizer.from_pretrained(str(_saved(tokenizer, tmp_path / "tok")))
    bare.chat_template = None
    bare.save_pretrained(str(tmp_path / "bare"))
    (tmp_path / "bare" / "chat_template.jinja").unlink(missing_ok=True)
    record = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    data = _write_jsonl(tmp_path / "chat.jsonl", [record])
    assert _run(tmp_path / "bare", tmp_path / "out", data) == 2
    assert "chat template" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}</s>{% endfor %}")
    assert _run(tmp_path / "bare", tmp_path / "out", data, extra=("--chat_template", str(template))) == 0
    row = load_from_disk(str(tmp_path / "out" / "train"))[0]
    assert row["prompt_ids"] == tokenizer.encode("[user] Hi</s>")
    assert row["chosen_ids"] == tokenizer.encode("[assistant] yes", add_special_tokens=False) + [2]
    assert (
        AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer")).chat_template
        == template.read_text()
    )


# ---------------------------------------------------------------- bad input, both modes

# reason -> (file name, lines; the bad record is the last line), extra CLI args. Each file also holds GOOD.
GOOD_LINE = json.dumps(GOOD).encode()
_USER_HI = {"role": "user", "content": "Hi"}
GOOD_CHAT_LINE = json.dumps(
    {
        "chosen": [_USER_HI, {"role": "assistant", "content": "yes"}],
        "rejected": [_USER_HI, {"role": "assistant", "content": "no"}],
    }
).encode()
# Chat templates for the template_error and tokenizer_error cases (named "@name" in a case's CLI args): the
# fixture's ChatML-like template, one refusing system messages, one that writes a lone surrogate for "!".
_TURN = "<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n"
_GENERATION = "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
TEMPLATES = {
    "no_system": "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
    "{% endif %}" + _TURN + "{% endfor %}" + _GENERATION,
    "bang_to_surrogate": "{% for m in messages %}" + _TURN.replace("}}</s>", "| replace('!', '\\ud800') }}</s>")
    + "{% endfor %}" + _GENERATION,
}
GOOD_RANKED_LINE = b'{"prompt": "The answer is", "responses": [" yes", " no", " maybe"], "scores": [2, 0, 1]}'
BAD_CASES: dict[str, tuple[str, list[bytes], tuple[str, ...]]] = {
    "invalid_json": ("a.jsonl", [GOOD_LINE, b'{"prompt": "a",'], ()),
    "not_an_object": ("a.jsonl", [GOOD_LINE, b"[1, 2]"], ()),
    "missing_field": ("a.jsonl", [GOOD_LINE, b'{"prompt": "a", "chosen": " b"}'], ()),
    "wrong_type": ("a.jsonl", [GOOD_LINE, b'{"prompt": "a", "chosen": 1, "rejected": " c"}'], ()),
    "empty_prompt": ("a.jsonl", [GOOD_LINE, b'{"prompt": "", "chosen": " b", "rejected": " c"}'], ()),
    "empty_response": ("a.jsonl", [GOOD_LINE, b'{"prompt": "a", "chosen": "", "rejected": " c"}'], ()),
    "chosen_equals_rejected": (
        "a.jsonl",
        [GOOD_LINE, b'{"prompt": "a", "chosen": " b", "rejected": " b"}'],
        (),
    ),
    "mixed_shapes": ("a.jsonl", [GOOD_LINE, b'{"chosen": "a b", "rejected": "a c"}'], ()),
    "undecodable_bytes": (
        "a.jsonl",
        [GOOD_LINE, b'{"prompt": "a\xff", "chosen": " b", "rejected": " c"}'],
        (),
    ),
    "no_shared_prompt": (
        "a.jsonl",
        [b'{"chosen": "Yes it is", "rejected": "Yes no"}', b'{"chosen": "a", "rejected": "b"}'],
        (),
    ),
    "not_a_json_array": ("a.json", [b'"a string, not an array"'], ()),
    "identical_after_truncation": (
        "a.jsonl",
        [GOOD_LINE, b'{"prompt": "Say", "chosen": " hello world", "rejected": " hello there"}'],
        ("--max_length", "4", "--max_prompt_length", "2"),
    ),
    "invalid_unicode": ("a.jsonl", [GOOD_LINE, b'{"prompt": "a\\ud800", "chosen": " b", "rejected": " c"}'], ()),
    "template_error": (
        "a.jsonl",
        [
            GOOD_CHAT_LINE,
            b'{"prompt": [{"role": "system", "content": "Be brief"}], "chosen": [{"role": "assistant", '
            b'"content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}',
        ],
        ("--chat_template", "@no_system"),
    ),
    # Ranked records (k answers, data_prep.ranked); the good record beside them is ranked too.
    "too_few_responses": ("a.jsonl", [GOOD_RANKED_LINE, b'{"prompt": "a", "responses": [" b"], "scores": [1]}'], ()),
    "all_tied": ("a.jsonl", [GOOD_RANKED_LINE, b'{"prompt": "a", "responses": [" b", " c"], "scores": [1, 1]}'], ()),
    "bad_score": ("a.jsonl", [GOOD_RANKED_LINE, b'{"instruction": "a", "completions": [{"response": " b", '
                                                b'"overall_score": 2}, {"response": " c", "overall_score": NaN}]}'],
                  ()),
    "tokenizer_error": (
        "a.jsonl",
        [GOOD_CHAT_LINE, GOOD_CHAT_LINE.replace(b'"no"', b'"no!"')],
        ("--chat_template", "@bang_to_surrogate"),
    ),
}


def test_every_reason_has_a_case() -> None:
    assert set(BAD_CASES) == {reason.value for reason in Reason}


def _bad_input(tmp_path: Path, reason: str) -> tuple[list[Path], str, tuple[str, ...]]:
    name, lines, extra = BAD_CASES[reason]
    bad = tmp_path / name
    bad.write_bytes(b"\n".join(lines) + b"\n")
    inputs = [bad]
    if name.endswith(".json"):  # the whole file is the bad record: the good one lives beside it
        inputs.append(_write_jsonl(tmp_path / "good.jsonl", [GOOD]))
    extra = tuple(_template_file(tmp_path, arg[1:]) if arg.startswith("@") else arg for arg in extra)
    return inputs, f"{bad}:{len(lines)}", extra


def _template_file(folder: Path, name: str) -> str:
    path = folder / f"{name}.jinja"
    path.write_text(TEMPLATES[name])
    return str(path)


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_is_skipped_counted_and_located(tokenizer_dir: Path, tmp_path: Path, reason: str) -> None:
    inputs, location, extra = _bad_input(tmp_path, reason)
    output = tmp_path / "out"
    assert _run(tokenizer_dir, output, *inputs, extra=extra) == 0
    report = _report(output)
    assert {key: count for key, count in report["skipped"].items() if count} == {reason: 1}
    assert report["skipped_examples"][reason] == [location]
    assert report["records_read"] == 2 and report["pairs_written"] == {"train": 1, "eval": 0}
    _assert_nothing_lost(report)


@pytest.mark.parametrize("reason", sorted(BAD_CASES))
def test_bad_record_stops_the_run_in_error_mode(
    tokenizer_dir: Path, tmp_path: Path, reason: str, capsys: pytest.CaptureFixture
) -> None:
    inputs, location, extra = _bad_input(tmp_path, reason)
    output = tmp_path / "out"
    assert _run(tokenizer_dir, output, *inputs, extra=(*extra, "--on_bad_record", "error")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{location}: {reason}: ")
    assert not output.exists()


def test_error_mode_as_a_subprocess(tokenizer_dir: Path, tmp_path: Path) -> None:
    inputs, location, _ = _bad_input(tmp_path, "missing_field")
    command = [
        sys.executable,
        "-m",
        "data_prep",
        "--input",
        str(inputs[0]),
        "--tokenizer",
        str(tokenizer_dir),
    ]
    command += ["--output", str(tmp_path / "out"), "--on_bad_record", "error"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"{location}: missing_field: no 'rejected'"
    assert done.stdout == "" and not (tmp_path / "out").exists()


def test_skip_mode_counts_many_bad_records(tokenizer_dir: Path, tmp_path: Path) -> None:
    lines = [json.dumps(record) for record in _many(5)] + ["oops"] * 7 + ['{"prompt": "a"}'] * 2
    data = tmp_path / "a.jsonl"
    data.write_text("\n".join(lines) + "\n")
    assert _run(tokenizer_dir, tmp_path / "out", data) == 0
    report = _report(tmp_path / "out")
    assert report["records_read"] == 14 and report["pairs_written"]["train"] == 5
    assert report["skipped"]["invalid_json"] == 7 and report["skipped"]["missing_field"] == 2
    assert report["skipped_examples"]["invalid_json"] == [f"{data}:{line}" for line in range(6, 11)]
    _assert_nothing_lost(report)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no records"),
        (b"not json\n", "no train pair survived"),
        (b"\x1f\x8b garbage", "cannot read"),
    ],
)
def test_empty_or_useless_input_is_an_error(
    tokenizer_dir: Path, tmp_path: Path, content: bytes, message: str, capsys: pytest.CaptureFixture
) -> None:
    data = tmp_path / ("a.jsonl.gz" if content.startswith(b"\x1f\x8b") else "a.jsonl")
    data.write_bytes(content)
    assert _run(tokenizer_dir, tmp_path / "out", data) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- truncation, counters


def test_truncation_is_counted(tokenizer_dir: Path, tmp_path: Path) -> None:
    records = [GOOD, {"prompt": "Say hello world again", "chosen": " yes hello world", "rejected": " no"}]
    data = _write_jsonl(tmp_path / "a.jsonl", records)
    assert (
        _run(tokenizer_dir, tmp_path / "out", data, extra=("--max_length", "7", "--max_prompt_length", "4"))
        == 0
    )
    report = _report(tmp_path / "out")
    assert report["truncated_pairs"] == 1 and report["boundary_adjusted"] == 0
    rows = load_from_disk(str(tmp_path / "out" / "train")).to_list()
    assert [len(row["prompt_ids"]) for row in rows] == [4, 4]  # [<s> The Ġanswer Ġis], cut from 6
    assert [len(row["prompt_ids"]) + len(row["chosen_ids"]) for row in rows] == [6, 7]
    assert report["token_lengths"]["prompt"]["max"] == 4


def test_truncation_is_counted_per_split(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Hand-counted: under --max_length 7 --max_prompt_length 4, GOOD ([<s> The Ġanswer Ġis] + one answer token)
    fits and every "Say hello world ..." pair is cut. Train holds 2 cut pairs of 3, eval 1 of 2."""
    def long(n: int) -> dict:
        return {"prompt": f"Say hello world again {n}", "chosen": " yes hello world", "rejected": " no"}

    train = _write_jsonl(tmp_path / "train.jsonl", [GOOD, long(1), long(2)])
    held_out = _write_jsonl(tmp_path / "eval.jsonl", [{**GOOD, "chosen": " no", "rejected": " yes"}, long(3)])
    extra = ("--max_length", "7", "--max_prompt_length", "4", "--eval_input", str(held_out))
    assert _run(tokenizer_dir, tmp_path / "out", train, extra=extra) == 0
    report = _report(tmp_path / "out")
    assert report["pairs_written"] == {"train": 3, "eval": 2}
    assert report["truncated_pairs_by_split"] == {"train": 2, "eval": 1}
    assert report["truncated_pairs"] == 3  # the total, kept for readers of the earlier report
    assert _run(tokenizer_dir, tmp_path / "alone", train, extra=extra[:4]) == 0
    assert _report(tmp_path / "alone")["truncated_pairs_by_split"] == {"train": 2, "eval": 0}


# ---------------------------------------------------------------- split, shards, output


def test_eval_fraction_is_seeded_deterministic_and_prompt_disjoint(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    records = _many(40)
    records.append({**records[0], "chosen": " maybe"})  # shares a prompt with record 0
    data = _write_jsonl(tmp_path / "a.jsonl", records)

    def split(name: str, seed: str) -> tuple[list[int], list[int], dict]:
        output = tmp_path / name
        assert _run(tokenizer_dir, output, data, extra=("--eval_fraction", "0.1", "--seed", seed)) == 0
        train = list(load_from_disk(str(output / "train"))["source_index"])
        evaluation = list(load_from_disk(str(output / "eval"))["source_index"])
        return train, evaluation, _report(output)

    train, evaluation, report = split("a", "0")
    again_train, again_eval, again = split("b", "0")
    _, other_eval, _ = split("c", "1")
    assert (train, evaluation) == (again_train, again_eval) and report["data_hash"] == again["data_hash"]
    assert other_eval != evaluation
    assert sorted(train + evaluation) == list(range(41))
    assert len(evaluation) in (4, 5)  # round(0.1 * 41) = 4, or 5 when record 0's prompt group is drawn
    assert (0 in evaluation) == (40 in evaluation)
    assert report["pairs_written"] == {"train": len(train), "eval": len(evaluation)}


def test_split_eval_by_hand() -> None:
    def pair(prompt: int, index: int) -> TokenizedPair:
        return TokenizedPair([1, prompt], [5, 2], [6, 2], index, f"f:{index}", False, False)

    pairs = [pair(10, 0), pair(11, 1), pair(10, 2), pair(12, 3)]
    train, evaluation = split_eval(pairs, fraction=0.25, seed=0)
    held = {p.index for p in evaluation}
    assert held in ({0, 2}, {1}, {3})  # whole prompt groups only
    assert [p.index for p in train] == [p.index for p in pairs if p.index not in held]
    assert split_eval(pairs, fraction=0.25, seed=0) == (train, evaluation)


def test_eval_input_is_its_own_split(tokenizer_dir: Path, tmp_path: Path) -> None:
    train_data = _write_jsonl(tmp_path / "train.jsonl", _many(3))
    eval_data = _write_jsonl(tmp_path / "eval.jsonl", [GOOD, {"prompt": "x"}])
    output = tmp_path / "out"
    assert _run(tokenizer_dir, output, train_data, extra=("--eval_input", str(eval_data))) == 0
    report = _report(output)
    assert report["pairs_written"] == {"train": 3, "eval": 1} and report["records_read"] == 5
    assert report["skipped_examples"]["missing_field"] == [f"{eval_data}:2"]
    assert list(load_from_disk(str(output / "eval"))["source_index"]) == [0]
    _assert_nothing_lost(report)


def test_shards_are_written_and_do_not_change_the_data(tokenizer_dir: Path, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "a.jsonl", _many(10))
    assert _run(tokenizer_dir, tmp_path / "one", data) == 0
    assert _run(tokenizer_dir, tmp_path / "three", data, extra=("--num_shards", "3", "--num_proc", "2")) == 0
    files = sorted(path.name for path in (tmp_path / "three" / "train").glob("*.arrow"))
    assert files == [f"data-0000{n}-of-00003.arrow" for n in range(3)]
    assert _report(tmp_path / "three")["num_shards"] == {"train": 3}
    one, three = (load_from_disk(str(tmp_path / name / "train")) for name in ("one", "three"))
    assert one.to_list() == three.to_list()
    assert _report(tmp_path / "one")["data_hash"] == _report(tmp_path / "three")["data_hash"]


def test_num_proc_and_batches_keep_order(tokenizer_dir: Path, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "a.jsonl", _many(25))
    assert _run(tokenizer_dir, tmp_path / "a", data) == 0
    assert _run(tokenizer_dir, tmp_path / "b", data, extra=("--num_proc", "2", "--batch_size", "4")) == 0
    assert list(load_from_disk(str(tmp_path / "b" / "train"))["source_index"]) == list(range(25))
    assert _report(tmp_path / "a")["data_hash"] == _report(tmp_path / "b")["data_hash"]


def test_token_columns_hash_ignores_storage_width_but_not_values() -> None:
    rows = {"prompt_ids": [[1, 5]], "chosen_ids": [[6, 2]], "rejected_ids": [[7, 2]]}
    base = split_sha256(Dataset.from_dict(rows))  # int64 columns
    assert base == split_sha256(prepare.to_dataset([TokenizedPair([1, 5], [6, 2], [7, 2], 0, "", 0, 0)]))
    assert base != split_sha256(Dataset.from_dict({**rows, "chosen_ids": [[6, 6, 2]]}))
    assert data_sha256({"train": base}) != data_sha256({"eval": base})


def test_non_empty_output_is_refused_without_overwrite(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _write_jsonl(tmp_path / "a.jsonl", [GOOD])
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    assert _run(tokenizer_dir, output, data) == 2
    assert "data_prep did not write (keep.txt)" in capsys.readouterr().err
    assert _run(tokenizer_dir, output, data, extra=("--overwrite",)) == 2  # not ours: never replaced
    assert [path.name for path in output.iterdir()] == ["keep.txt"]
    (output / "keep.txt").unlink()
    assert _run(tokenizer_dir, output, data) == 0
    assert _run(tokenizer_dir, output, data) == 2  # our own previous output: replaced only with --overwrite
    assert "pass --overwrite" in capsys.readouterr().err
    assert _run(tokenizer_dir, output, data, extra=("--overwrite",)) == 0
    assert sorted(path.name for path in output.iterdir()) == ["prep_report.json", "tokenizer", "train"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jsonl", "out"]  # no temporary left behind


def test_an_empty_output_directory_is_used(tokenizer_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    assert _run(tokenizer_dir, tmp_path / "out", _write_jsonl(tmp_path / "a.jsonl", [GOOD])) == 0
    assert (tmp_path / "out" / "prep_report.json").is_file()


def test_a_crash_mid_write_leaves_no_output_and_no_temporary(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write_jsonl(tmp_path / "a.jsonl", _many(4))
    output = tmp_path / "out"
    written = prepare.write_split

    def crash_after_writing(path: Path, dataset: Dataset, num_shards: int) -> int:
        written(path, dataset, num_shards)  # the shards are on disk when the "crash" happens
        raise RuntimeError("disk full")

    monkeypatch.setattr(prepare, "write_split", crash_after_writing)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(tokenizer_dir, output, data)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jsonl"]

    # Overwriting: the previous output survives a crash untouched.
    monkeypatch.setattr(prepare, "write_split", written)
    assert _run(tokenizer_dir, output, data) == 0
    before = _report(output)
    monkeypatch.setattr(prepare, "write_split", crash_after_writing)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(tokenizer_dir, output, _write_jsonl(tmp_path / "b.jsonl", [GOOD]), extra=("--overwrite",))
    assert _report(output) == before and len(load_from_disk(str(output / "train"))) == 4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]
