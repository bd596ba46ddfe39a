"""`--help` for the commands that take the training config (`dpo.train`, `dpo.precompute_ref`), generated from
the trailing `# ...` comment on each field line of `TrainConfig` in dpo/config.py, so the flag documentation lives
in one place and a new field appears in `--help` the moment it is declared.

    python -m dpo.train --help
    python -m dpo.precompute_ref --help
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from typing import Any

from dpo.config import TrainConfig

HELP_FLAGS = ("--help", "-h")


@dataclass(frozen=True)
class FlagDoc:
    name: str
    type_name: str  # "float", "int or none", "list[str] or none", ...
    default: str  # as it would be written on the command line
    help: str  # the field's trailing comment ("" when it has none)
    section: str  # the "# --- name" header above the field


def wants_help(argv: list[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv)


def field_comments(cls: type = TrainConfig) -> dict[str, tuple[str, str]]:
    """{field name: (section, trailing comment)} read from the class source: the comment on the line where the
    field's statement ends, and the nearest `# --- section` line above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}  # line number -> comment text without '#'
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    sections = sorted((line, text.strip("- ").strip()) for line, text in comments.items() if text.startswith("---"))
    class_def = ast.parse(source).body[0]
    out: dict[str, tuple[str, str]] = {}
    for node in class_def.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            section = next((text for line, text in reversed(sections) if line < node.lineno), "")
            out[node.target.id] = (section, comments.get(node.end_lineno, ""))
    return out


def type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(type_name(a) for a in rest) + " or none"
    if typing.get_origin(tp) is list:
        return f"comma-separated {type_name(args[0])} list"
    return getattr(tp, "__name__", str(tp))


def cli_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value) if value != "" else '""'


def flag_docs() -> list[FlagDoc]:
    """One FlagDoc per TrainConfig field, in declaration order."""
    hints = typing.get_type_hints(TrainConfig)
    comments = field_comments(TrainConfig)
    docs = []
    for field in dataclasses.fields(TrainConfig):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        section, comment = comments.get(field.name, ("", ""))
        docs.append(FlagDoc(field.name, type_name(hints[field.name]), cli_value(default), comment, section))
    return docs


def format_help(prog: str, description: str, *, extra_flags: tuple[tuple[str, str], ...] = ()) -> str:
    """The full `--help` text: usage, what the command does, then every flag grouped by section."""
    lines = [f"usage: {prog} [--config RECIPE.yaml] [--name value ...]", "", description.strip(), "",
             "A recipe (--config) sets flags from YAML; flags on the command line win. `--name value` or",
             "`--name=value`; a bare boolean flag means true; `none` clears an optional value. TRL's and",
             "alignment-handbook's names (model_name_or_path, per_device_train_batch_size, bf16, dataset_mixture,",
             "...) are read as these flags: README, Coming from TRL (dpo/trl_names.py).", "",
             "  --config PATH                            a YAML recipe of the flags below"]
    lines += [f"  {flag:<40} {text}" for flag, text in extra_flags]
    section = None
    for doc in flag_docs():
        if doc.section != section:
            section = doc.section
            lines += ["", f"{section or 'other'}:"]
        head = f"--{doc.name} ({doc.type_name}, default {doc.default})"
        lines.append(f"  {head:<40} {doc.help}" if len(head) <= 40 else f"  {head}\n  {'':<40} {doc.help}")
    return "\n".join(lines) + "\n"
