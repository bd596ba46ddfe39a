"""data_prep.formats: reading files, shape detection, normalisation, skip reasons with file:line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_prep.formats import (
    BadRecord,
    BadRecordError,
    InputError,
    PreferencePair,
    Reason,
    SkipLog,
    expand_inputs,
    normalise,
    read_inputs,
    split_implicit,
)

EXPLICIT = {"prompt": "Say", "chosen": " yes", "rejected": " no"}
HH_CHOSEN = "\n\nHuman: Hi\n\nAssistant: Hello there"
HH_REJECTED = "\n\nHuman: Hi\n\nAssistant: Go away"


def _jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _read(paths: list[Path], shape: str | None = None) -> tuple[list[PreferencePair], SkipLog, dict]:
    skips = SkipLog()
    result = read_inputs([str(path) for path in paths], shape=shape, skips=skips)  # type: ignore[arg-type]
    assert result.records_read == len(result.pairs) + skips.total
    return result.pairs, skips, result.formats


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


# ---------------------------------------------------------------- file kinds


def test_json_array_jsonl_and_gzip_read_the_same_records(tmp_path: Path) -> None:
    records = [EXPLICIT, {"prompt": "Q", "chosen": " a", "rejected": " b", "id": 7}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2))
    _jsonl(tmp_path / "b.jsonl", records)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress((tmp_path / "b.jsonl").read_bytes()))
    (tmp_path / "d.json.gz").write_bytes(gzip.compress((tmp_path / "a.json").read_bytes()))
    for name in ("a.json", "b.jsonl", "c.jsonl.gz", "d.json.gz"):
        pairs, skips, formats = _read([tmp_path / name])
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [
            ("Say", " yes", " no"),
            ("Q", " a", " b"),
        ]
        assert skips.total == 0
        assert formats == {str(tmp_path / name): "explicit"}


def test_locations_are_the_line_where_each_record_starts(tmp_path: Path) -> None:
    # Line 1 "[", record 0 on lines 2-6, record 1 on lines 7-11 (indent=2 puts each key on its own line).
    (tmp_path / "a.json").write_text(json.dumps([EXPLICIT, EXPLICIT], indent=2))
    pairs, _, _ = _read([tmp_path / "a.json"])
    assert [p.location for p in pairs] == [f"{tmp_path / 'a.json'}:2", f"{tmp_path / 'a.json'}:7"]
    (tmp_path / "b.jsonl").write_text(json.dumps(EXPLICIT) + "\n\n" + json.dumps(EXPLICIT) + "\n")
    pairs, _, _ = _read([tmp_path / "b.jsonl"])
    assert [p.location for p in pairs] == [f"{tmp_path / 'b.jsonl'}:1", f"{tmp_path / 'b.jsonl'}:3"]
    assert [p.index for p in pairs] == [0, 1]


def test_a_json_file_holding_json_lines_is_read_as_lines(tmp_path: Path) -> None:
    _jsonl(tmp_path / "lines.json", [EXPLICIT, EXPLICIT])
    pairs, skips, _ = _read([tmp_path / "lines.json"])
    assert len(pairs) == 2 and skips.total == 0


def test_line_separators_inside_strings_do_not_split_records(tmp_path: Path) -> None:
    record = {"prompt": "a\u2028b", "chosen": " c\u2029", "rejected": " d\x85"}
    (tmp_path / "a.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    pairs, _, _ = _read([tmp_path / "a.jsonl"])
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a\u2028b", " c\u2029", " d\x85")]


def test_a_directory_is_read_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _jsonl(tmp_path / "b.jsonl", [{"prompt": "B", "chosen": " x", "rejected": " y"}])
    _jsonl(tmp_path / "sub" / "a.jsonl", [{"prompt": "A", "chosen": " x", "rejected": " y"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert expand_inputs([str(tmp_path)]) == [tmp_path / "b.jsonl", tmp_path / "sub" / "a.jsonl"]
    pairs, _, _ = _read([tmp_path])
    assert [p.prompt for p in pairs] == ["B", "A"]


@pytest.mark.parametrize("name", ["missing.jsonl", "data.csv", "empty_dir"])
def test_unusable_inputs_are_errors(tmp_path: Path, name: str) -> None:
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match=name):
        expand_inputs([str(tmp_path / name)])


def test_corrupt_gzip_is_an_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(InputError, match="cannot read"):
        _read([tmp_path / "a.jsonl.gz"])


# ---------------------------------------------------------------- shapes


def test_explicit_shape_keeps_texts_and_ignores_extra_fields() -> None:
    pair = normalise({**EXPLICIT, "score": [1, 2], "meta": None}, "f:1", shape=None, index=3)
    assert pair == PreferencePair("Say", " yes", " no", "explicit", "f:1", 3)


def test_implicit_hh_prompt_ends_after_the_last_shared_assistant_marker() -> None:
    pair = normalise({"chosen": HH_CHOSEN, "rejected": HH_REJECTED}, "f:1", shape=None, index=0)
    assert isinstance(pair, PreferencePair) and pair.shape == "implicit"
    assert (pair.prompt, pair.chosen, pair.rejected) == (
        "\n\nHuman: Hi\n\nAssistant:",
        " Hello there",
        " Go away",
    )


def test_implicit_multi_turn_uses_the_last_shared_marker() -> None:
    shared = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: A joke?\n\nAssistant:"
    assert split_implicit(shared + " No.", shared + " Sure!") == (shared, " No.", " Sure!")
    # Both answers start with "The": the marker, not the longest common prefix, ends the prompt.
    assert split_implicit(shared + " The cat.", shared + " The dog.") == (shared, " The cat.", " The dog.")


def test_implicit_without_marker_falls_back_to_the_common_prefix_at_a_word_boundary() -> None:
    assert split_implicit("The answer is yes", "The answer is no") == ("The answer is", " yes", " no")
    assert split_implicit("The answer is yes", "The answer is yeah") == ("The answer is", " yes", " yeah")
    assert split_implicit("Hello", "Help") == ("Hel", "lo", "p")  # no whitespace: the raw common prefix
    assert split_implicit("abc", "xyz") is None


def test_conversational_shared_leading_messages_are_the_prompt() -> None:
    history = [_user("Hi"), _assistant("Hello."), _user("A joke?")]
    record = {"chosen": history + [_assistant("Sure!")], "rejected": history + [_assistant("No.")]}
    pair = normalise(record, "f:1", shape=None, index=0)
    assert isinstance(pair, PreferencePair) and pair.shape == "conversational"
    assert pair.prompt == history
    assert (pair.chosen, pair.rejected) == ([_assistant("Sure!")], [_assistant("No.")])


def test_conversational_explicit_prompt_as_messages_or_string() -> None:
    as_list = {"prompt": [_user("Hi")], "chosen": [_assistant("Hello")], "rejected": [_assistant("Bye")]}
    # UltraFeedback-binarized: prompt is a string and chosen/rejected repeat it as their first message.
    as_string = {
        "prompt": "Hi",
        "chosen": [_user("Hi"), _assistant("Hello")],
        "rejected": [_user("Hi"), _assistant("Bye")],
    }
    for record in (as_list, as_string):
        pair = normalise(record, "f:1", shape=None, index=0)
        assert isinstance(pair, PreferencePair)
        assert (pair.prompt, pair.chosen, pair.rejected) == (
            [_user("Hi")],
            [_assistant("Hello")],
            [_assistant("Bye")],
        )


def test_message_extra_keys_are_dropped() -> None:
    record = {
        "chosen": [_user("Hi"), {**_assistant("A"), "name": "x"}],
        "rejected": [_user("Hi"), _assistant("B")],
    }
    pair = normalise(record, "f:1", shape=None, index=0)
    assert isinstance(pair, PreferencePair) and pair.chosen == [_assistant("A")]


def test_forced_shape_overrides_detection() -> None:
    # An explicit-looking record read as implicit: "prompt" is then just an extra field.
    record = {"prompt": "ignored", "chosen": "The answer is yes", "rejected": "The answer is no"}
    pair = normalise(record, "f:1", shape="implicit", index=0, forced=True)
    assert isinstance(pair, PreferencePair) and pair.prompt == "The answer is"
    bad = normalise({"chosen": "a b", "rejected": "a c"}, "f:2", shape="explicit", index=1, forced=True)
    assert bad == BadRecord("f:2", Reason.MISSING_FIELD, "no 'prompt'")


# ---------------------------------------------------------------- bad records


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1, 2], Reason.NOT_AN_OBJECT),
        ("text", Reason.NOT_AN_OBJECT),
        ({"prompt": "a", "chosen": " b"}, Reason.MISSING_FIELD),
        ({"prompt": "a", "chosen": 1, "rejected": " c"}, Reason.WRONG_TYPE),
        ({"prompt": 5, "chosen": " b", "rejected": " c"}, Reason.WRONG_TYPE),
        ({"prompt": " ", "chosen": " b", "rejected": " c"}, Reason.EMPTY_PROMPT),
        ({"prompt": "a", "chosen": "  ", "rejected": " c"}, Reason.EMPTY_RESPONSE),
        ({"prompt": "a", "chosen": " b", "rejected": " b"}, Reason.CHOSEN_EQUALS_REJECTED),
        ({"chosen": "abc", "rejected": "xyz"}, Reason.NO_SHARED_PROMPT),
        ({"chosen": "Hi there", "rejected": "Hi"}, Reason.EMPTY_RESPONSE),
        (
            {"chosen": [_user("a"), _assistant("b")], "rejected": [_user("c"), _assistant("d")]},
            Reason.NO_SHARED_PROMPT,
        ),
        ({"chosen": [_user("a"), "b"], "rejected": [_user("a")]}, Reason.WRONG_TYPE),
        ({"chosen": [_user("a"), {"role": "assistant"}], "rejected": [_user("a")]}, Reason.MISSING_FIELD),
        (
            {"chosen": [_user("a"), _assistant("")], "rejected": [_user("a"), _assistant("b")]},
            Reason.EMPTY_RESPONSE,
        ),
        (
            {"chosen": [_user("a"), _assistant("b")], "rejected": [_user("a"), _assistant("b")]},
            Reason.CHOSEN_EQUALS_REJECTED,
        ),
        ({"prompt": [], "chosen": [_assistant("b")], "rejected": [_assistant("c")]}, Reason.EMPTY_PROMPT),
        ({"prompt": 3, "chosen": [_assistant("b")], "rejected": [_assistant("c")]}, Reason.WRONG_TYPE),
        ({"chosen": "text", "rejected": [_assistant("c")]}, Reason.WRONG_TYPE),
    ],
)
def test_each_bad_record_gets_its_reason(record: object, reason: Reason) -> None:
    bad = normalise(record, "data.jsonl:4", shape=None, index=0)
    assert isinstance(bad, BadRecord)
    assert (bad.location, bad.reason) == ("data.jsonl:4", reason)


def test_file_level_reasons_carry_file_and_line(tmp_path: Path) -> None:
    good = json.dumps(EXPLICIT).encode()
    lines = [
        good,  # 1
        b'{"prompt": "a", ',  # 2: invalid_json
        good.replace(b"Say", b"Sa\xff"),  # 3: undecodable_bytes (0xff is never valid UTF-8)
        json.dumps(
            {"chosen": "x y", "rejected": "x z"}
        ).encode(),  # 4: mixed_shapes (implicit, explicit file)
        b"[1]",  # 5: not_an_object
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines))
    pairs, skips, formats = _read([path])
    assert [p.location for p in pairs] == [f"{path}:1"]
    nonzero = {reason: count for reason, count in skips.counts.items() if count}
    assert nonzero == {"invalid_json": 1, "undecodable_bytes": 1, "mixed_shapes": 1, "not_an_object": 1}
    assert skips.examples["invalid_json"] == [f"{path}:2"]
    assert skips.examples["undecodable_bytes"] == [f"{path}:3"]
    assert skips.examples["mixed_shapes"] == [f"{path}:4"]
    assert skips.examples["not_an_object"] == [f"{path}:5"]
    assert formats == {str(path): "explicit"}


def test_a_broken_json_array_keeps_the_records_before_the_error(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        '[\n{"prompt": "a", "chosen": " b", "rejected": " c"},\n{"prompt": "a" "chosen": 1},\n{}\n]'
    )
    pairs, skips, _ = _read([path])
    assert [p.location for p in pairs] == [f"{path}:2"]
    assert skips.total == 1 and skips.examples["invalid_json"] == [f"{path}:3"]


def test_a_json_file_that_is_not_an_array_is_one_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text('\n"just a string"\n')
    pairs, skips, formats = _read([path])
    assert pairs == [] and skips.examples["not_a_json_array"] == [f"{path}:2"]
    assert formats == {str(path): "unknown"}


def test_examples_stop_at_five_but_counts_do_not(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("nope\n" * 7 + json.dumps(EXPLICIT) + "\n")
    pairs, skips, _ = _read([path])
    assert len(pairs) == 1 and skips.counts["invalid_json"] == 7
    assert skips.examples["invalid_json"] == [f"{path}:{line}" for line in range(1, 6)]


def test_strict_skip_log_raises_on_the_first_bad_record(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(EXPLICIT) + "\n" + json.dumps({"prompt": "a", "chosen": " b"}) + "\n")
    with pytest.raises(BadRecordError) as caught:
        read_inputs([str(path)], shape=None, skips=SkipLog(strict=True))
    assert caught.value.bad.location == f"{path}:2" and caught.value.bad.reason == Reason.MISSING_FIELD
    assert str(caught.value) == f"{path}:2: missing_field: no 'rejected'"


# ---------------------------------------------------------------- hostile records: skipped and counted, never a crash


def _counts(skips: SkipLog) -> dict[str, int]:
    return {reason: count for reason, count in skips.counts.items() if count}


def test_deeply_nested_record_is_invalid_json_in_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    deep = '{"prompt": "a", "chosen": " b", "rejected": " c", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path.write_text("\n".join([json.dumps(EXPLICIT), deep, json.dumps(EXPLICIT)]) + "\n")
    pairs, skips, _ = _read([path])
    assert [pair.location for pair in pairs] == [f"{path}:1", f"{path}:3"]
    assert _counts(skips) == {"invalid_json": 1} and skips.examples["invalid_json"] == [f"{path}:2"]


def test_deeply_nested_element_of_a_json_array_is_skipped_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    # The deep element holds brackets inside a string and an escaped quote: the scan must not count them.
    deep = '{"x": "]]\\"[", "y": ' + "[" * 50_000 + "]" * 50_000 + "}"
    path.write_text("[\n" + json.dumps(EXPLICIT) + ",\n" + deep + ",\n" + json.dumps(EXPLICIT) + "\n]\n")
    pairs, skips, _ = _read([path])
    assert [pair.location for pair in pairs] == [f"{path}:2", f"{path}:4"]
    assert _counts(skips) == {"invalid_json": 1} and skips.examples["invalid_json"] == [f"{path}:3"]


def test_a_number_too_long_to_convert_is_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    long_number = '{"prompt": "a", "chosen": " b", "rejected": " c", "n": ' + "9" * 5000 + "}"
    path.write_text(json.dumps(EXPLICIT) + "\n" + long_number + "\n")
    pairs, skips, _ = _read([path])
    assert len(pairs) == 1 and _counts(skips) == {"invalid_json": 1}
    array = tmp_path / "b.json"
    array.write_text("[" + json.dumps(EXPLICIT) + ", " + "9" * 5000 + ", " + json.dumps(EXPLICIT) + "]")
    pairs, skips, _ = _read([array])
    assert len(pairs) == 2 and _counts(skips) == {"invalid_json": 1}


@pytest.mark.parametrize(
    "record",
    [
        {"prompt": "Say \ud800", "chosen": " yes", "rejected": " no"},
        {"prompt": "Say", "chosen": " yes \udfff", "rejected": " no"},
        {"chosen": [_user("Hi"), _assistant("yes\ud800")], "rejected": [_user("Hi"), _assistant("no")]},
        {
            "chosen": [{"role": "us\udc80er", "content": "Hi"}, _assistant("yes")],
            "rejected": [{"role": "us\udc80er", "content": "Hi"}, _assistant("no")],
        },
    ],
)
def test_a_lone_surrogate_escape_is_invalid_unicode(tmp_path: Path, record: dict) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record) + "\n")  # json.dumps writes the lone surrogate as a "\udXXX" escape
    assert "\\ud" in path.read_text()
    pairs, skips, _ = _read([path])
    assert pairs == [] and _counts(skips) == {"invalid_unicode": 1}


def test_a_surrogate_pair_escape_is_ordinary_text(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": "Smile \U0001F600", "chosen": " yes", "rejected": " no"}])
    assert "\\ud83d\\ude00" in path.read_text()
    pairs, skips, _ = _read([path])
    assert [pair.prompt for pair in pairs] == ["Smile \U0001F600"] and skips.total == 0


# ---------------------------------------------------------------- shape detection is not decided by a bad record


def test_a_null_prompt_first_does_not_make_an_explicit_file_mixed(tmp_path: Path) -> None:
    others = [{"prompt": f"Q{n}", "chosen": " yes", "rejected": " no"} for n in range(3)]
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": None, "chosen": "a b", "rejected": "a c"}, *others])
    pairs, skips, formats = _read([path])
    assert formats == {str(path): "explicit"}
    assert [pair.prompt for pair in pairs] == ["Q0", "Q1", "Q2"] and [pair.index for pair in pairs] == [1, 2, 3]
    assert _counts(skips) == {"missing_field": 1} and skips.examples["missing_field"] == [f"{path}:1"]


def test_a_bad_first_record_does_not_decide_the_shape(tmp_path: Path) -> None:
    implicit = {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    bad_explicit = {"prompt": "Q", "chosen": "", "rejected": " no"}  # explicit, but empty: must not decide
    path = _jsonl(tmp_path / "a.jsonl", [bad_explicit, implicit, implicit])
    pairs, skips, formats = _read([path])
    assert formats == {str(path): "implicit"} and len(pairs) == 2
    assert _counts(skips) == {"mixed_shapes": 1} and skips.examples["mixed_shapes"] == [f"{path}:1"]


@pytest.mark.parametrize("position", [0, 1])
@pytest.mark.parametrize("other", [EXPLICIT, {"chosen": HH_CHOSEN, "rejected": HH_REJECTED}])
def test_a_prompt_of_the_wrong_type_is_wrong_type_wherever_it_stands(
    tmp_path: Path, position: int, other: dict
) -> None:
    records = [other, other]
    records.insert(position, {"prompt": 7, "chosen": " yes", "rejected": " no"})
    path = _jsonl(tmp_path / "a.jsonl", records)
    pairs, skips, _ = _read([path])
    assert len(pairs) == 2
    assert _counts(skips) == {"wrong_type": 1} and skips.examples["wrong_type"] == [f"{path}:{position + 1}"]


def test_null_prompts_throughout_are_an_implicit_file(tmp_path: Path) -> None:
    record = {"prompt": None, "chosen": HH_CHOSEN, "rejected": HH_REJECTED}
    path = _jsonl(tmp_path / "a.jsonl", [record, record])
    pairs, skips, formats = _read([path])
    assert formats == {str(path): "implicit"} and skips.total == 0
    assert [pair.prompt for pair in pairs] == ["\n\nHuman: Hi\n\nAssistant:"] * 2


def test_strict_mode_stops_at_the_first_bad_record_even_while_the_shape_is_undecided(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "a.jsonl", [{"prompt": None, "chosen": "a b", "rejected": "a c"}, EXPLICIT, {"x": 1}])
    with pytest.raises(BadRecordError) as raised:
        read_inputs([str(path)], shape=None, skips=SkipLog(strict=True))
    assert raised.value.bad.location == f"{path}:1" and raised.value.bad.reason == Reason.MISSING_FIELD


# ---------------------------------------------------------------- inputs skip data_prep's own folders


def test_folders_written_by_data_prep_are_not_searched(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    raw = _jsonl(tmp_path / "data" / "raw.jsonl", [EXPLICIT])
    output = tmp_path / "data" / "prepped"
    (output / "train").mkdir(parents=True)
    (output / "prep_report.json").write_text("{}")
    (output / "train" / "state.json").write_text('{"x": 1}')
    staging = tmp_path / "data" / ".prepped.tmp-123@host-abcd1234"
    staging.mkdir()
    _jsonl(staging / "junk.jsonl", [EXPLICIT])
    skipped: list[Path] = []
    assert expand_inputs([str(tmp_path / "data")], skipped_folders=skipped) == [raw]
    assert sorted(skipped) == sorted([output, staging])
    with pytest.raises(InputError, match="a data_prep output, not raw input"):
        expand_inputs([str(output)])
