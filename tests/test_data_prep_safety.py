"""data_prep refusals, end to end: nothing deleted that data_prep did not write, clear tokenizer and eval errors,
one stderr line and exit 2 per user error, killed runs recovered by running the command again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import load_from_disk

from data_prep.prepare import main
from dpo import atomic

GOOD = {"prompt": "The answer is", "chosen": " yes", "rejected": " no"}
REPO = Path(__file__).resolve().parents[1]


def _pairs(count: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {n}?", "chosen": f" yes {n}", "rejected": f" no {n}"} for n in range(start, count)]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _prep(tokenizer: Path, output: Path, *inputs: Path, extra: tuple[str, ...] = ()) -> int:
    argv = [arg for path in inputs for arg in ("--input", str(path))]
    return main([*argv, "--tokenizer", str(tokenizer), "--output", str(output), *extra])


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its bytes (None for folders): what a user would miss if it changed."""
    return {
        str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in sorted(root.rglob("*"))
    }


def _error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _report(output: Path) -> dict:
    return json.loads((output / "prep_report.json").read_text())


# ---------------------------------------------------------------- --output never among the inputs


@pytest.mark.parametrize(
    ("output", "relation"),
    [
        ("data", "is --input"),  # --output equal to the input folder
        (".", "contains --input"),  # an ancestor holding the input and unrelated files
        ("data/prepped", "lies inside --input"),
        ("data/raw.jsonl", "is --input"),
    ],
)
def test_output_among_the_inputs_is_refused_even_with_overwrite(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, output: str, relation: str
) -> None:
    raw = _jsonl(tmp_path / "data" / "raw.jsonl", [GOOD])
    (tmp_path / "notes.txt").write_text("unrelated")
    before = _tree(tmp_path)
    input_arg = raw if output.endswith(".jsonl") else tmp_path / "data"
    assert _prep(tokenizer_dir, tmp_path / output, input_arg, extra=("--overwrite",)) == 2
    line = _error_line(capsys)
    assert relation in line and "never writes where it reads" in line
    assert _tree(tmp_path) == before  # input, unrelated file: all still there; no report, no staging folder


def test_output_through_a_symbolic_link_to_the_input_is_refused(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _jsonl(tmp_path / "data" / "raw.jsonl", [GOOD])
    (tmp_path / "link").symlink_to(tmp_path / "data")
    before = _tree(tmp_path / "data")
    assert _prep(tokenizer_dir, tmp_path / "link", tmp_path / "data", extra=("--overwrite",)) == 2
    assert "is --input" in _error_line(capsys)
    assert _tree(tmp_path / "data") == before and (tmp_path / "link").is_symlink()


def test_output_equal_to_the_tokenizer_folder_is_refused(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = _tree(tokenizer_dir)
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    assert _prep(tokenizer_dir, tokenizer_dir, raw, extra=("--overwrite",)) == 2
    assert "is --tokenizer" in _error_line(capsys)
    assert _tree(tokenizer_dir) == before


# ---------------------------------------------------------------- --overwrite replaces only our own outputs


@pytest.mark.parametrize(
    "content",
    [
        {"thesis.tex": b"years of work"},  # anything of the user's
        {"prep_report.json": b'{"mine": true}', "train/data.txt": b"x"},  # a report that is not ours
        {"prep_report.json": b"not json"},
    ],
)
def test_overwrite_never_replaces_a_folder_data_prep_did_not_write(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, content: dict[str, bytes]
) -> None:
    output = tmp_path / "out"
    for name, data in content.items():
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes(data)
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    before = _tree(tmp_path)
    assert _prep(tokenizer_dir, output, raw, extra=("--overwrite",)) == 2
    assert "data_prep did not write" in _error_line(capsys)
    assert _tree(tmp_path) == before


def test_an_output_that_is_a_file_is_refused_even_with_overwrite(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "out").write_text("a file of the user's")
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    assert _prep(tokenizer_dir, tmp_path / "out", raw, extra=("--overwrite",)) == 2
    assert "exists and is not a folder" in _error_line(capsys)
    assert (tmp_path / "out").read_text() == "a file of the user's"


def test_overwrite_refuses_our_output_once_the_user_added_files(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", _pairs(3))
    output = tmp_path / "out"
    assert _prep(tokenizer_dir, output, raw) == 0
    (output / "my_notes.md").write_text("keep me")
    capsys.readouterr()
    assert _prep(tokenizer_dir, output, raw, extra=("--overwrite",)) == 2
    assert "plus files it did not write (my_notes.md)" in _error_line(capsys)
    assert (output / "my_notes.md").read_text() == "keep me"
    (output / "my_notes.md").unlink()
    assert _prep(tokenizer_dir, output, raw, extra=("--overwrite",)) == 0


# ---------------------------------------------------------------- inputs skip our own outputs


def test_an_output_inside_an_input_folder_is_not_read_back(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _jsonl(tmp_path / "data" / "raw.jsonl", _pairs(4))
    assert _prep(tokenizer_dir, tmp_path / "data" / "prepped", raw) == 0
    staging = tmp_path / "data" / f".prepped.tmp-{os.getppid()}@{atomic._HOST}-abcd1234"  # a run in progress
    _jsonl(staging / "half.jsonl", _pairs(9))
    capsys.readouterr()
    assert _prep(tokenizer_dir, tmp_path / "out", tmp_path / "data") == 0
    report = _report(tmp_path / "out")
    assert report["records_read"] == 4 and report["pairs_written"]["train"] == 4
    assert sorted(report["skipped_folders"]) == sorted([str(tmp_path / "data" / "prepped"), str(staging)])
    assert f"not read: {tmp_path / 'data' / 'prepped'} (written by data_prep" in capsys.readouterr().err


def test_a_prep_output_given_as_input_is_refused(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    assert _prep(tokenizer_dir, tmp_path / "prepped", raw) == 0
    capsys.readouterr()
    assert _prep(tokenizer_dir, tmp_path / "out", tmp_path / "prepped") == 2
    assert "a data_prep output, not raw input" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- killed runs: running the command again recovers


_KILLER = """
import os, signal, sys
import dpo.atomic as atomic
import data_prep.prepare as prepare
where = sys.argv[1]
if where == "writing":  # killed while the shards are being written into the staging folder
    write = prepare.write_split
    def write_split(path, dataset, num_shards):
        write(path, dataset, num_shards)
        os.kill(os.getpid(), signal.SIGKILL)
    prepare.write_split = write_split
else:  # killed between the two renames: the previous output moved aside, the new one not yet in place
    real = os.replace
    def replace(source, target):
        real(source, target)
        if str(target).endswith("/previous"):
            os.kill(os.getpid(), signal.SIGKILL)
    atomic.os.replace = replace
sys.exit(prepare.main(sys.argv[2:]))
"""


def _killed_run(where: str, argv: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", _KILLER, where, *argv], env=env, capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]


def _argv(tokenizer: Path, output: Path, raw: Path, *extra: str) -> list[str]:
    return ["--input", str(raw), "--tokenizer", str(tokenizer), "--output", str(output), *extra]


def test_a_run_killed_while_writing_leaves_a_staging_folder_the_next_run_removes(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", _pairs(3))
    output = tmp_path / "out"
    _killed_run("writing", _argv(tokenizer_dir, output, raw))
    leftovers = [path for path in tmp_path.iterdir() if atomic.is_staging_name(path.name)]
    assert len(leftovers) == 1 and not output.exists()
    assert _prep(tokenizer_dir, output, raw) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "raw.jsonl"]
    assert f"removed {leftovers[0]} (unfinished output of a killed run)" in capsys.readouterr().err
    assert len(load_from_disk(str(output / "train"))) == 3


def test_a_run_killed_between_the_two_renames_is_recovered_by_running_it_again(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    output = tmp_path / "out"
    assert _prep(tokenizer_dir, output, _jsonl(tmp_path / "old.jsonl", _pairs(2))) == 0
    previous = _tree(output)
    new = _jsonl(tmp_path / "new.jsonl", _pairs(5))
    _killed_run("renaming", _argv(tokenizer_dir, output, new, "--overwrite"))
    assert not output.exists()  # the kill hit after the first rename

    # Running it again puts the previous output back first (here without --overwrite, so it then stops there).
    capsys.readouterr()
    assert _prep(tokenizer_dir, output, new) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"data_prep: restored {output}") and "pass --overwrite" in err[-1]
    assert _tree(output) == previous
    assert sorted(path.name for path in tmp_path.iterdir()) == ["new.jsonl", "old.jsonl", "out"]
    assert _prep(tokenizer_dir, output, new, extra=("--overwrite",)) == 0
    assert _report(output)["pairs_written"]["train"] == 5


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data_prep.prepare as prepare

    def full(path: Path, dataset: object, num_shards: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare, "write_split", full)
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    assert _prep(tokenizer_dir, tmp_path / "out", raw) == 2
    assert "cannot write: [Errno 28] No space left on device" in _error_line(capsys)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw.jsonl"]


# ---------------------------------------------------------------- tokenizer: local only, clear messages


def test_tokenizer_problems_are_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    cases = {
        "/nonexistent/tokenizer": "no such folder",
        str(tmp_path / "empty"): "the folder holds no tokenizer.json or tokenizer_config.json",
        str(raw): "a file; pass the folder that holds it",
        str(tmp_path / "broken"): "cannot load the tokenizer",
    }
    for name, message in cases.items():
        assert _prep(Path(name), tmp_path / "out", raw) == 2
        line = _error_line(capsys)
        assert line.startswith(f"error: --tokenizer {name}: {message}"), line
        assert "Repo id" not in line and "sentencepiece" not in line
    assert not (tmp_path / "out").exists()


def test_a_model_name_is_not_downloaded_and_fails_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture, network_attempts: list
) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    assert _prep(Path("someorg/some-model"), tmp_path / "out", raw) == 2
    assert network_attempts == []  # not a single try, so no retries (they took ~49 s when the Hub was asked)
    line = _error_line(capsys)
    assert "no model of that name in the local Hugging Face cache; data_prep never downloads" in line


def test_a_chat_template_with_a_syntax_error_is_refused(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }\n{% endfor %}")
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    assert _prep(tokenizer_dir, tmp_path / "out", raw, extra=("--chat_template", str(template))) == 2
    assert f"--chat_template {template}: template syntax error, line 1" in _error_line(capsys)


# ---------------------------------------------------------------- eval split: no leak, no options that do nothing


@pytest.mark.parametrize("eval_input", ["data/train.jsonl", "data", "data/sub/eval.jsonl"])
def test_eval_input_overlapping_the_input_is_refused(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, eval_input: str
) -> None:
    _jsonl(tmp_path / "data" / "train.jsonl", _pairs(4))
    _jsonl(tmp_path / "data" / "sub" / "eval.jsonl", _pairs(6, 4))
    train_arg = tmp_path / ("data" if eval_input.startswith("data/sub") else "data/train.jsonl")
    extra = ("--eval_input", str(tmp_path / eval_input))
    assert _prep(tokenizer_dir, tmp_path / "out", train_arg, extra=extra) == 2
    assert "the eval pairs would be training pairs" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_eval_input_repeating_every_training_prompt_is_refused_and_a_partial_overlap_is_counted(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", _pairs(4))
    copy = _jsonl(tmp_path / "copy.jsonl", _pairs(4)[1:3])
    assert _prep(tokenizer_dir, tmp_path / "out", train, extra=("--eval_input", str(copy))) == 2
    assert "every eval prompt (2) is also a training prompt" in _error_line(capsys)
    assert not (tmp_path / "out").exists()

    partial = _jsonl(tmp_path / "partial.jsonl", _pairs(4)[3:] + _pairs(7, 4))  # 1 of 4 eval prompts seen
    assert _prep(tokenizer_dir, tmp_path / "out", train, extra=("--eval_input", str(partial))) == 0
    assert "warning: 1 of 4 eval pairs have a training prompt" in capsys.readouterr().err
    assert _report(tmp_path / "out")["eval_prompts_in_train"] == 1


@pytest.mark.parametrize("extra", [("--seed", "3"), ("--seed", "3", "--eval_input", "EVAL")])
def test_eval_only_options_without_an_eval_fraction_split_are_errors(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: tuple[str, ...]
) -> None:
    train = _jsonl(tmp_path / "train.jsonl", _pairs(3))
    held_out = _jsonl(tmp_path / "eval.jsonl", _pairs(5, 3))
    extra = tuple(str(held_out) if arg == "EVAL" else arg for arg in extra)
    with pytest.raises(SystemExit) as stopped:
        _prep(tokenizer_dir, tmp_path / "out", train, extra=extra)
    assert stopped.value.code == 2
    assert "--seed only seeds the --eval_fraction split" in _error_line(capsys)


# ---------------------------------------------------------------- as a user sees it: exit 2, one line, no traceback


def test_a_user_error_as_a_subprocess_is_one_line_exit_2_and_no_traceback(tokenizer_dir: Path, tmp_path: Path) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    command = [sys.executable, "-m", "data_prep", "--input", str(raw), "--tokenizer", "/nonexistent"]
    done = subprocess.run(
        [*command, "--output", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: --tokenizer /nonexistent: no such folder"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw.jsonl"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--max_length", "0"), "python -m data_prep: error: need 1 <= --max_prompt_length < --max_length"),
        (("--bogus",), "python -m data_prep: error: unrecognized arguments: --bogus (see --help)"),
        (("--format", "csv"), "python -m data_prep: error: argument --format: invalid choice: 'csv'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: tuple[str, ...], message: str
) -> None:
    raw = _jsonl(tmp_path / "raw.jsonl", [GOOD])
    with pytest.raises(SystemExit) as stopped:
        _prep(tokenizer_dir, tmp_path / "out", raw, extra=extra)
    assert stopped.value.code == 2
    assert _error_line(capsys).startswith(message)


# ---------------------------------------------------------------- one run, every hostile record: counted, never fatal


def test_hostile_records_in_skip_mode_are_counted_by_reason_across_worker_processes(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    text = tmp_path / "text.jsonl"
    lines = [
        '{"prompt": null, "chosen": "a b", "rejected": "a c"}',  # first: must not make the file implicit
        *[json.dumps(record) for record in _pairs(3)],
        '{"prompt": 7, "chosen": " b", "rejected": " c"}',
        '{"prompt": "a\\ud800", "chosen": " b", "rejected": " c"}',
        '{"prompt": "a", "chosen": " b", "rejected": " c", "x": ' + "[" * 20_000 + "]" * 20_000 + "}",
        '{"prompt": "a", "chosen": " b", "rejected": " c", "n": ' + "1" * 5000 + "}",
    ]
    text.write_text("\n".join(lines) + "\n")
    hi = {"role": "user", "content": "Hi"}
    system = {"role": "system", "content": "Be brief"}

    def chat(prompt: list[dict], chosen: str, rejected: str) -> dict:
        return {
            "chosen": [*prompt, {"role": "assistant", "content": chosen}],
            "rejected": [*prompt, {"role": "assistant", "content": rejected}],
        }

    chat_file = _jsonl(
        tmp_path / "chat.jsonl",
        [chat([hi], "yes", "no"), chat([system, hi], "yes", "no"), chat([hi], "yes", "no!"), chat([hi], "a", "b")],
    )
    template = tmp_path / "t.jinja"  # refuses system messages, writes a lone surrogate for "!"
    template.write_text(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m['role'] }}|>\n{{ m['content'] | replace('!', '\\ud800') }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    output = tmp_path / "out"
    extra = ("--chat_template", str(template), "--num_proc", "2", "--batch_size", "2")
    assert _prep(tokenizer_dir, output, text, chat_file, extra=extra) == 0
    report = _report(output)
    assert {reason: count for reason, count in report["skipped"].items() if count} == {
        "missing_field": 1,
        "wrong_type": 1,
        "invalid_unicode": 1,
        "invalid_json": 2,
        "template_error": 1,
        "tokenizer_error": 1,
    }
    assert report["skipped_examples"]["template_error"] == [f"{chat_file}:2"]
    assert report["skipped_examples"]["tokenizer_error"] == [f"{chat_file}:3"]
    assert report["skipped_examples"]["invalid_json"] == [f"{text}:7", f"{text}:8"]
    assert report["format"] == {str(text): "explicit", str(chat_file): "conversational"}
    assert report["records_read"] == 12 and report["pairs_written"]["train"] == 5
    assert list(load_from_disk(str(output / "train"))["source_index"]) == [1, 2, 3, 8, 11]
