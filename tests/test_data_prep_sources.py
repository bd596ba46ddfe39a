"""data_prep.sources: Parquet files and folders, save_to_disk folders and cached dataset names prepare to the same
token ids as the equivalent JSON Lines, in every common schema, with bad rows located as "file:row".

Oracles: the same records written as JSONL and prepared by the JSON path (already tested against hand-worked ids),
and the tokenizer's own `apply_chat_template` + encode of the conversation for where the prompt must end. Nothing
is downloaded: named datasets come from a `datasets` cache built here, read with HF_HUB_OFFLINE.
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from transformers import PreTrainedTokenizerFast

from data_prep import sources
from data_prep.formats import InputError, SkipLog
from data_prep.prepare import main
from data_prep.sources import ColumnMap, open_input, read_sources

TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>\nTools: {% for tool in tools %}{{ tool['name'] }}({{ tool['description'] }}) "
    "{% endfor %}</s>\n{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def ultrafeedback_rows(count: int, offset: int = 0) -> list[dict]:
    """UltraFeedback-binarized columns: prompt string, whole conversations, scores, the SFT `messages`."""
    rows = []
    for n in range(offset, offset + count):
        prompt = f"What is two plus two? Question {n}."
        chosen = [user(prompt), assistant(f"Two plus two is four. {n}")]
        rows.append({"prompt": prompt, "prompt_id": f"{n:064x}", "chosen": chosen,
                     "rejected": [user(prompt), assistant(f"I do not know the answer, sorry. {n}")],
                     "messages": chosen, "score_chosen": 9.0, "score_rejected": 2.5})
    return rows


def write_parquet(path: Path, rows: list[dict], **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, **options)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ultrafeedback_folder(root: Path) -> Path:
    """The Hub layout of HuggingFaceH4/ultrafeedback_binarized: data/{split}-00000-of-00001.parquet."""
    for split, count, offset in (("train_prefs", 6, 0), ("test_prefs", 3, 100), ("train_sft", 4, 200)):
        write_parquet(root / "data" / f"{split}-00000-of-00001.parquet", ultrafeedback_rows(count, offset))
    (root / "README.md").write_text("# a local copy\n")
    return root


def prep(tokenizer_dir: Path, output: Path, *inputs: str | Path, extra: tuple[str, ...] = ()) -> int:
    argv = [arg for name in inputs for arg in ("--input", str(name))]
    return main([*argv, "--tokenizer", str(tokenizer_dir), "--output", str(output), *extra])


def report(output: Path) -> dict:
    return json.loads((output / "prep_report.json").read_text())


def rows(output: Path, split: str = "train") -> list[dict]:
    return load_from_disk(str(output / split)).to_list()


def chat_ids(tokenizer: PreTrainedTokenizerFast, messages: list[dict], *, generation: bool, **kwargs) -> list[int]:
    """The oracle: the tokenizer's own rendering and encoding (BOS added; rendered conversations end in EOS)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation, **kwargs)
    return tokenizer(text if generation else text.rstrip())["input_ids"]


# ---------------------------------------------------------------- UltraFeedback-binarized, no flags


def test_ultrafeedback_folder_prepares_with_no_flags_like_its_jsonl(
    tokenizer: PreTrainedTokenizerFast, tokenizer_dir: Path, tmp_path: Path
) -> None:
    folder = ultrafeedback_folder(tmp_path / "ultrafeedback_binarized")
    assert prep(tokenizer_dir, tmp_path / "out", folder) == 0
    jsonl = write_jsonl(tmp_path / "train_prefs.jsonl", ultrafeedback_rows(6))
    assert prep(tokenizer_dir, tmp_path / "out_jsonl", jsonl) == 0

    parquet_report, jsonl_report = report(tmp_path / "out"), report(tmp_path / "out_jsonl")
    train_prefs = folder / "data" / "train_prefs-00000-of-00001.parquet"
    assert Path(next(iter(parquet_report["format"]))).resolve() == train_prefs.resolve()  # train_prefs only
    assert list(parquet_report["format"].values()) == ["conversational"]
    assert parquet_report["records_read"] == 6 and parquet_report["pairs_written"]["train"] == 6
    assert rows(tmp_path / "out") == rows(tmp_path / "out_jsonl")
    assert parquet_report["data_hash"] == jsonl_report["data_hash"]

    # The prompt is the user turn once, the answer only the assistant turn: no duplicated prompt.
    for row, record in zip(rows(tmp_path / "out"), ultrafeedback_rows(6)):
        assert row["prompt_ids"] == chat_ids(tokenizer, record["chosen"][:1], generation=True)
        assert row["prompt_ids"] + row["chosen_ids"] == chat_ids(tokenizer, record["chosen"], generation=False)
        assert row["prompt_ids"] + row["rejected_ids"] == chat_ids(tokenizer, record["rejected"], generation=False)
        assert tokenizer.decode(row["prompt_ids"] + row["chosen_ids"]).count(record["prompt"]) == 1


def test_eval_input_defaults_to_the_test_split_and_splits_can_be_named(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    folder = ultrafeedback_folder(tmp_path / "uf")
    assert prep(tokenizer_dir, tmp_path / "out", folder, extra=("--eval_input", str(folder))) == 0
    assert report(tmp_path / "out")["pairs_written"] == {"train": 6, "eval": 3}
    assert prep(tokenizer_dir, tmp_path / "sft", folder, extra=("--input_split", "train_sft")) == 0
    assert report(tmp_path / "sft")["pairs_written"]["train"] == 4
    extra = ("--eval_input", str(folder), "--eval_split", "train_sft")
    assert prep(tokenizer_dir, tmp_path / "named", folder, extra=extra) == 0
    assert report(tmp_path / "named")["pairs_written"] == {"train": 6, "eval": 4}
    with pytest.raises(SystemExit) as exit_info:
        prep(tokenizer_dir, tmp_path / "no_eval", folder, extra=("--eval_split", "test_prefs"))
    assert exit_info.value.code == 2


def test_ambiguous_or_unknown_splits_and_missing_columns_are_one_line_errors(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = tmp_path / "two"
    for split in ("alpha", "beta"):
        write_parquet(folder / "data" / f"{split}-00000-of-00001.parquet", ultrafeedback_rows(2))
    cases = [
        ((folder,), (), "several splits (alpha, beta) and none of train, train_prefs: pass --input_split"),
        ((folder,), ("--input_split", "gamma"), "no split 'gamma' (splits: alpha, beta)"),
        ((folder / "data" / "alpha-00000-of-00001.parquet",), ("--input_split", "alpha"), "none of the inputs has"),
        ((folder,), ("--input_split", "alpha", "--chosen_column", "good"), "no column 'good' (columns: prompt,"),
    ]
    for inputs, extra, message in cases:
        assert prep(tokenizer_dir, tmp_path / "out", *inputs, extra=extra) == 2  # a user error: one line, exit 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    write_jsonl(folder / "data" / "more.jsonl", [])
    assert prep(tokenizer_dir, tmp_path / "out", folder, extra=("--input_split", "alpha")) == 2
    assert "holds both .parquet and JSON files" in capsys.readouterr().err


# ---------------------------------------------------------------- the other schemas


def test_multi_turn_argilla_rows_keep_every_shared_turn_in_the_prompt(
    tokenizer: PreTrainedTokenizerFast, tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Argilla's capybara-style rows: `prompt` holds the first turn only; the answers differ in the last turn."""
    history = [user("Tell me a joke."), assistant("Why did the chicken cross the road?"), user("Why?")]
    with_prompt = {"source": "x", "prompt": "Tell me a joke.", "chosen_rating": 5, "chosen_model": "a",
                   "chosen": history + [assistant("To get to the other side.")], "rejected_rating": 1,
                   "rejected": history + [assistant("No idea.")], "rejected_model": "b"}
    no_prompt = {key: value for key, value in with_prompt.items() if key != "prompt"}  # argilla/dpo-mix style
    table = write_parquet(tmp_path / "argilla.parquet", [with_prompt, no_prompt])
    assert prep(tokenizer_dir, tmp_path / "out", table) == 0
    first, second = rows(tmp_path / "out")
    assert first["prompt_ids"] == second["prompt_ids"] == chat_ids(tokenizer, history, generation=True)
    assert first["chosen_ids"] == second["chosen_ids"]
    assert tokenizer.decode(first["chosen_ids"]) == "To get to the other side.</s>"


def test_trl_lib_rows_with_tools_render_them_through_the_template(
    tokenizer: PreTrainedTokenizerFast, tokenizer_dir: Path, tmp_path: Path
) -> None:
    tools = [{"name": "add", "description": "adds two numbers"}, {"name": "joke", "description": "tells a joke"}]
    records = [
        {"prompt": [user("What is two plus two?")], "chosen": [assistant("four")], "rejected": [assistant("five")],
         "tools": json.dumps(tools)},
        {"prompt": [user("Say hello.")], "chosen": [assistant("hello")], "rejected": [assistant("no")], "tools": None},
    ]
    template = tmp_path / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    extra = ("--chat_template", str(template))
    assert prep(tokenizer_dir, tmp_path / "out", write_parquet(tmp_path / "trl.parquet", records), extra=extra) == 0
    jsonl = write_jsonl(tmp_path / "trl.jsonl", [{**records[0], "tools": tools}, records[1]])
    assert prep(tokenizer_dir, tmp_path / "out_jsonl", jsonl, extra=extra) == 0
    assert rows(tmp_path / "out") == rows(tmp_path / "out_jsonl")

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    with_tools, without = rows(tmp_path / "out")
    assert with_tools["prompt_ids"] == chat_ids(tokenizer, records[0]["prompt"], generation=True, tools=tools)
    assert "Tools: add(adds two numbers) joke(tells a joke)" in tokenizer.decode(with_tools["prompt_ids"])
    assert without["prompt_ids"] == chat_ids(tokenizer, records[1]["prompt"], generation=True)
    assert "Tools" not in tokenizer.decode(without["prompt_ids"])


def test_column_mapping_reads_other_names_in_parquet_and_json(tokenizer_dir: Path, tmp_path: Path) -> None:
    """Explicit string columns under other names (Argilla's orca pairs: `input`), mapped; other columns ignored."""
    explicit = [{"prompt": f"Question {n}: yes or no?", "chosen": f" yes {n}", "rejected": f" no {n}"}
                for n in range(4)]
    renamed = [{"input": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "prompt": "not this one",
                "chosen": "nor this"} for r in explicit]
    mapping = ("--prompt_column", "input", "--chosen_column", "good", "--rejected_column", "bad")
    assert prep(tokenizer_dir, tmp_path / "plain", write_jsonl(tmp_path / "plain.jsonl", explicit)) == 0
    assert prep(tokenizer_dir, tmp_path / "pq", write_parquet(tmp_path / "r.parquet", renamed), extra=mapping) == 0
    assert prep(tokenizer_dir, tmp_path / "js", write_jsonl(tmp_path / "r.jsonl", renamed), extra=mapping) == 0
    assert rows(tmp_path / "pq") == rows(tmp_path / "js") == rows(tmp_path / "plain")
    assert list(report(tmp_path / "pq")["format"].values()) == ["explicit"]
    assert ColumnMap(chosen="good").rename({"good": "a", "chosen": "b", "x": 1}) == {"x": 1, "chosen": "a"}
    swapped = ColumnMap(chosen="rejected", rejected="chosen")
    assert swapped.rename({"prompt": "p", "chosen": "c", "rejected": "r"}) == {
        "prompt": "p", "chosen": "r", "rejected": "c"}
    with pytest.raises(InputError, match="three different columns"):
        read_sources([], shape=None, skips=SkipLog(), columns=ColumnMap(prompt="chosen"))


# ---------------------------------------------------------------- save_to_disk folders


def test_save_to_disk_dataset_dict_with_splits_and_a_single_dataset(tokenizer_dir: Path, tmp_path: Path) -> None:
    train, test = ultrafeedback_rows(7), ultrafeedback_rows(3, offset=100)
    saved = tmp_path / "saved"
    DatasetDict({"train_prefs": Dataset.from_list(train), "test_prefs": Dataset.from_list(test)}).save_to_disk(
        str(saved), num_shards={"train_prefs": 2, "test_prefs": 1}
    )
    assert prep(tokenizer_dir, tmp_path / "out", saved) == 0  # train_prefs by default, both shards in order
    assert prep(tokenizer_dir, tmp_path / "ref", write_jsonl(tmp_path / "train.jsonl", train)) == 0
    assert rows(tmp_path / "out") == rows(tmp_path / "ref")
    assert [Path(name).name for name in report(tmp_path / "out")["format"]] == [
        "data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]

    assert prep(tokenizer_dir, tmp_path / "test", saved, extra=("--input_split", "test_prefs")) == 0
    assert prep(tokenizer_dir, tmp_path / "test_ref", write_jsonl(tmp_path / "test.jsonl", test)) == 0
    assert rows(tmp_path / "test") == rows(tmp_path / "test_ref")

    single = tmp_path / "single"
    Dataset.from_list(test).save_to_disk(str(single))
    assert prep(tokenizer_dir, tmp_path / "single_out", single) == 0
    assert rows(tmp_path / "single_out") == rows(tmp_path / "test_ref")


# ---------------------------------------------------------------- bad rows


def test_bad_rows_are_counted_and_located_by_file_and_row(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = ultrafeedback_rows(5)
    good[2]["rejected"] = good[2]["chosen"]  # row 2: chosen == rejected
    good[3]["chosen"] = None  # row 3: a null cell is a missing field
    table = write_parquet(tmp_path / "bad.parquet", good, row_group_size=2)
    assert prep(tokenizer_dir, tmp_path / "out", table) == 0
    result = report(tmp_path / "out")
    assert result["records_read"] == 5 and result["pairs_written"]["train"] == 3
    assert result["skipped"]["chosen_equals_rejected"] == result["skipped"]["missing_field"] == 1
    assert result["skipped_examples"]["chosen_equals_rejected"] == [f"{table}:2"]
    assert result["skipped_examples"]["missing_field"] == [f"{table}:3"]
    assert [row["source_index"] for row in rows(tmp_path / "out")] == [0, 1, 4]

    capsys.readouterr()
    assert prep(tokenizer_dir, tmp_path / "strict", table, extra=("--on_bad_record", "error")) == 2
    assert capsys.readouterr().err.strip() == f"{table}:2: chosen_equals_rejected: identical conversations"

    saved = tmp_path / "saved"
    Dataset.from_list(good).save_to_disk(str(saved))
    assert prep(tokenizer_dir, tmp_path / "saved_out", saved) == 0
    assert report(tmp_path / "saved_out")["skipped_examples"]["missing_field"] == [
        f"{saved / 'data-00000-of-00001.arrow'}:3"]


# ---------------------------------------------------------------- streaming


def test_parquet_is_read_batch_by_batch_in_bounded_memory(tmp_path: Path) -> None:
    """20,000 rows (~31 MB of text) in 20 row groups: reading all of them never holds more than a few groups' worth,
    in Arrow's memory pool or in Python objects (a whole-file read would hold 20)."""
    filler = os.urandom(250).hex()  # 500 characters
    table = pa.table({"prompt": [f"{n} {filler}" for n in range(20_000)],
                      "chosen": [f"a{n} {filler}" for n in range(20_000)],
                      "rejected": [f"b{n} {filler}" for n in range(20_000)]})
    total_bytes = table.nbytes
    path = tmp_path / "big.parquet"
    pq.write_table(table, path, row_group_size=1000, compression="none")
    del table
    (source,) = open_input(str(path), None, sources.TRAIN_SPLITS, ColumnMap())
    assert source.rows == 20_000

    baseline = pa.total_allocated_bytes()
    tracemalloc.start()
    records = source.open()
    first_location, _ = next(records)
    peak_arrow = pa.total_allocated_bytes() - baseline
    count, last = 1, first_location
    for last, _ in records:
        count += 1
        peak_arrow = max(peak_arrow, pa.total_allocated_bytes() - baseline)
    _, peak_python = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert (first_location, last, count) == (f"{path}:0", f"{path}:19999", 20_000)
    one_group = total_bytes / 20
    assert peak_arrow < 4 * one_group, (peak_arrow, total_bytes)  # pyarrow's default pre_buffer: 1.1x the file
    assert peak_python < 4 * one_group, (peak_python, total_bytes)


def test_read_sources_numbers_records_across_json_and_parquet_inputs(tmp_path: Path) -> None:
    explicit = [{"prompt": f"q{n}", "chosen": f" a{n}", "rejected": f" b{n}"} for n in range(3)]
    inputs = [write_jsonl(tmp_path / "a.jsonl", explicit), write_parquet(tmp_path / "b.parquet", explicit)]
    result = read_sources([str(path) for path in inputs], shape=None, skips=SkipLog())
    assert [pair.index for pair in result.pairs] == list(range(6))
    assert [pair.location for pair in result.pairs] == [f"{inputs[0]}:{n}" for n in (1, 2, 3)] + [
        f"{inputs[1]}:{n}" for n in (0, 1, 2)]
    assert result.pairs[0].prompt == result.pairs[3].prompt == "q0"


# ---------------------------------------------------------------- dataset names (offline cache only)


@pytest.fixture
def offline_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `datasets` cache holding someorg/my_prefs as an online load_dataset would have left it, and offline mode."""
    import huggingface_hub.constants
    from datasets.packaged_modules.parquet.parquet import Parquet

    folder = ultrafeedback_folder(tmp_path / "source")
    files = {split: [str(folder / "data" / f"{split}-00000-of-00001.parquet")]
             for split in ("train_prefs", "test_prefs")}
    builder = Parquet(cache_dir=str(tmp_path / "build"), dataset_name="my_prefs", hash="0123abcd", data_files=files)
    builder.download_and_prepare()
    cache = tmp_path / "cache"
    (cache / "someorg___my_prefs" / "default" / "0.0.0").mkdir(parents=True)
    shutil.move(builder.cache_dir, cache / "someorg___my_prefs" / "default" / "0.0.0" / "0123abcd")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    return folder


def test_a_dataset_name_loads_from_the_local_cache_offline(
    offline_cache: Path, tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, network_attempts: list
) -> None:
    assert prep(tokenizer_dir, tmp_path / "named", "someorg/my_prefs") == 0  # train_prefs by default
    assert prep(tokenizer_dir, tmp_path / "folder", offline_cache) == 0
    assert rows(tmp_path / "named") == rows(tmp_path / "folder")
    assert report(tmp_path / "named")["format"] == {"someorg/my_prefs[train_prefs]": "conversational"}

    extra = ("--input_split", "test_prefs[:2]", "--on_bad_record", "error")
    assert prep(tokenizer_dir, tmp_path / "sliced", "someorg/my_prefs", extra=extra) == 0
    assert report(tmp_path / "sliced")["records_read"] == 2

    assert prep(tokenizer_dir, tmp_path / "missing", "someorg/not_cached") == 2
    assert network_attempts == []  # offline: nothing tried, so no retries to wait for
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: someorg/not_cached: no such file or directory, and datasets.load_dataset cannot")


@pytest.mark.parametrize(
    ("tools", "expected"),
    [
        ('[{"name": "add"}]', [{"name": "add"}]),
        ([{"name": "add"}], [{"name": "add"}]),
        ("[]", None),
        ("[{not json", "'tools' is a string but not JSON"),
        ({"name": "add"}, "'tools' must be a list of objects"),
        (["add"], "'tools' must be a list of objects"),
    ],
)
def test_tools_are_a_list_of_schemas_or_its_json_string(tools: object, expected: object) -> None:
    from data_prep.formats import BadRecord, Reason, normalise

    record = {"prompt": [user("Hi")], "chosen": [assistant("yes")], "rejected": [assistant("no")], "tools": tools}
    pair = normalise(record, "f:1", shape=None, index=0)
    if isinstance(expected, str):
        assert isinstance(pair, BadRecord) and pair.reason == Reason.WRONG_TYPE and expected in pair.detail
    else:
        assert not isinstance(pair, BadRecord) and pair.tools == expected
