"""Where data_prep may write and what it may replace: never where it reads, never a folder it did not write.

- `check_not_overlapping(output, inputs)`: an `--output` equal to, containing or inside any input (the
  `--input`/`--eval_input` files and folders, the tokenizer folder, the chat template) is refused before anything
  is touched, so `--overwrite` can never delete an input.
- `check_output(output, overwrite=...)`: an absent or empty `--output` is used; one holding a previous data_prep
  output (recognised by its `prep_report.json`, written last) is replaced only with `--overwrite`; anything else
  is refused, `--overwrite` or not.
- `written_by_data_prep(folder)`: folders that inputs skip: previous outputs and staging folders of `dpo.atomic`.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo.atomic import is_staging_name, staging_target
from dpo.contract import REPORT_NAME

OUTPUT_ENTRIES = frozenset({"train", "eval", "tokenizer", REPORT_NAME})
_SHOWN = 3


class OutputError(Exception):
    """`--output` may not be written or replaced; nothing was touched."""


def written_by_data_prep(folder: Path) -> bool:
    """A folder that is (or was being written as) a data_prep output; never raw input."""
    return is_staging_name(folder.name) or (folder / REPORT_NAME).is_file()


def is_prep_output(folder: Path) -> bool:
    """`folder` holds a complete data_prep output: its report parses and has the report's own keys."""
    try:
        report = json.loads((folder / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"records_read", "pairs_written", "data_hash"} <= set(report)


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if source.is_relative_to(output):
        return "contains"
    if output.is_relative_to(source):
        return "lies inside"
    return None


def check_not_overlapping(output: Path, inputs: dict[str, list[str]]) -> None:
    """Refuse an output that is, contains or lies inside any input (`inputs`: flag -> the paths given to it)."""
    resolved = Path(output).resolve()
    for flag, paths in inputs.items():
        for name in paths:
            relation = _relation(resolved, Path(name).resolve())
            if relation is not None:
                raise OutputError(
                    f"--output {output} {relation} {flag} {name}: data_prep never writes where it reads; "
                    "choose an --output outside every input"
                )


def _listing(paths: list[Path]) -> str:
    names = sorted(path.name for path in paths)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def check_output(output: Path, *, overwrite: bool) -> None:
    """Raise `OutputError` unless `output` may be written: absent, empty, or a previous output with `overwrite`."""
    output = Path(output)
    if output.is_symlink() and not output.exists():
        raise OutputError(f"--output {output} is a broken symbolic link: remove it or choose another --output")
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} exists and is not a folder: choose another --output")
    if not output.is_dir():
        return
    entries = list(output.iterdir())
    if not entries:
        return
    if not is_prep_output(output):
        raise OutputError(
            f"--output {output} holds files data_prep did not write ({_listing(entries)}) and no "
            f"{REPORT_NAME}: data_prep replaces only its own outputs, even with --overwrite; choose another --output"
        )
    # What `python -m dpo.precompute_ref` may leave beside a split it replaces: dpo.atomic staging folders.
    foreign = [path for path in entries
               if path.name not in OUTPUT_ENTRIES and staging_target(path.name) not in ("train", "eval")]
    if foreign:
        raise OutputError(
            f"--output {output} holds a previous data_prep output plus files it did not write "
            f"({_listing(foreign)}): move them out or choose another --output"
        )
    if not overwrite:
        raise OutputError(f"--output {output} holds a previous data_prep output: pass --overwrite to replace it")
