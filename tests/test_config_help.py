"""`--help` on every command: the training flags are generated from the trailing comments of TrainConfig's field
lines, so every field must carry one; each CLI's help lists every option and exits 0."""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing

import pytest

from dpo.config import TrainConfig
from dpo.config_help import field_comments, flag_docs, format_help, type_name, wants_help


def test_every_config_field_has_a_help_comment():
    """The contract for whoever adds a field: a trailing `# one-line help` on its line."""
    comments = field_comments(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(comments) == names
    missing = [name for name, (_, text) in comments.items() if not text]
    assert not missing, f"TrainConfig fields without a trailing '# help' comment: {missing}"


class _Toy:
    # --- first section
    a: int = 1  # the a
    b: list[str] | None = None
    # a comment line above c is not c's help
    c: str = (
        "x"
    )  # ends on this line
    # --- second
    d: float | None = 0.5  # the d # with a hash


def test_field_comments_reads_trailing_comments_and_sections():
    assert field_comments(_Toy) == {"a": ("first section", "the a"), "b": ("first section", ""),
                                    "c": ("first section", "ends on this line"),
                                    "d": ("second", "the d # with a hash")}


def test_type_names():
    hints = typing.get_type_hints(_Toy)
    assert [type_name(hints[k]) for k in "abcd"] == ["int", "comma-separated str list or none", "str",
                                                     "float or none"]


@pytest.mark.parametrize("module", ["dpo.train", "dpo.precompute_ref"])
def test_config_cli_help_lists_every_field(module, capsys):
    """Each CLI's main with --help: every field, its type, its default and its comment; exit status 0 (the real
    `python -m dpo.train --help` process runs in tests/test_launch.py, through `./launch.sh train --help`)."""
    main = importlib.import_module(module).main
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: python -m {module}")
    for doc in flag_docs():
        line = next((x for x in text.splitlines() if x.strip().startswith(f"--{doc.name} (")), None)
        assert line is not None, f"--{doc.name} missing from {module} --help"
        assert f"({doc.type_name}, default {doc.default})" in line
        assert doc.help in text
    # spot checks against the dataclass, written out by hand
    assert "--beta (float, default 0.1)" in text
    assert "--rpo_alpha (float or none, default none)" in text
    assert "--prefix_sharing (bool or none, default none)" in text  # none: the layout probe decides
    assert ("--splits" in text) == (module == "dpo.precompute_ref")


def test_help_flag_detection_and_short_form(capsys):
    import dpo.train

    assert wants_help(["--beta", "0.2", "-h"]) and not wants_help(["--beta", "0.2"])
    assert dpo.train.main(["-h"]) == 0
    assert capsys.readouterr().out == format_help("python -m dpo.train", dpo.train.__doc__.split("\n\n")[0])


def test_argparse_cli_help_shows_types_and_defaults(capsys):
    from data_prep.prepare import parse_args
    from dpo.report import main as report_main

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"\s+", " ", capsys.readouterr().out)
    for option in ("--input", "--tokenizer", "--output", "--format", "--max_length", "--max_prompt_length",
                   "--on_bad_record", "--eval_fraction", "--eval_input", "--seed", "--num_shards", "--num_proc",
                   "--batch_size", "--overwrite", "--chat_template"):
        assert option in text, option
    assert "--max_length INT max prompt + response tokens, each side (default: 1024)" in text
    assert "--output PATH output directory, written atomically (required)" in text
    with pytest.raises(SystemExit) as exit_info:
        report_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "OUTPUT_DIR" in text and "--output PATH" in text
