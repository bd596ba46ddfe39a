"""Where records come from: JSON files, Parquet files and folders, `datasets` folders, dataset names.

Each `--input` becomes one or more named sources of ("location", record) pairs that `formats.read_records`
normalises exactly as it does JSON lines, so a Parquet row and the equivalent JSON line give the same pair, the
same tokens and the same report. What an input is, decided in this order:

- an existing `.json`/`.jsonl`(`.gz`) file, or a directory holding such files and no `.parquet`: JSON
  (`data_prep.formats`), locations "file:line" (1-based lines);
- an existing `.parquet` file: one table;
- a directory holding `dataset_dict.json`: a `DatasetDict.save_to_disk` folder, one split per subfolder;
- a directory holding `state.json`: a `Dataset.save_to_disk` folder, one split (the one it was saved from);
- a directory holding `.parquet` files (e.g. a Hub dataset repository cloned or copied): splits from the file
  names and any `configs` in its README.md, resolved by `datasets.load_dataset_builder` as the Hub does
  (`data/train_prefs-00000-of-00001.parquet` is split `train_prefs`; files that name no split are `train`);
- a path that does not exist and reads as `name` or `org/name`: `datasets.load_dataset(name)`, which uses the
  local cache offline (HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) and downloads where there is a network; here
  `--input_split` may be any `datasets` split expression (`train_prefs[:1000]`).

Splits. `--input_split` picks the split of every input that has splits (files do not); without it the split is
`train`, else `train_prefs`, else the only one (`--eval_split`: `test`, `test_prefs`, `validation`, else the only
one); otherwise the error lists the splits.

Tables (Parquet, Arrow, named datasets) are read in record batches of `BATCH_ROWS` rows and only the columns
used (`prompt`, `chosen`, `rejected` or their mapped names, and `tools` where present): memory holds one batch of
Python records plus Arrow's buffers for one Parquet row group (or nothing but a memory map for Arrow files),
whatever the file's size. A null cell is a field the record does not have. Locations are "file:row" with the
0-based row in that file (`pyarrow.parquet.read_table(file).slice(row, 1)`), or "org/name[split]:row" for a
named dataset (`load_dataset(name, split=split)[row]`).

Columns. `ColumnMap` reads other column (or JSON key) names as prompt/chosen/rejected; a table without its
chosen or rejected column, or without a prompt column named explicitly, is an error naming the columns it has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_prep.formats import (
    ANSWER_KEYS,
    INPUT_SUFFIXES,
    InputError,
    ReadResult,
    Shape,
    SkipLog,
    expand_inputs,
    iter_records,
    read_records,
)

BATCH_ROWS = 1000
TRAIN_SPLITS = ("train", "train_prefs")
EVAL_SPLITS = ("test", "test_prefs", "validation")
TOOLS_COLUMN = "tools"
# The columns of a table of k-answer records (data_prep.ranked), read as they are named.
RANKED_TABLE_COLUMNS = ("prompt", "instruction", "responses", "completions", "scores", "ranks", TOOLS_COLUMN)
_DATASET_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_Records = Iterator[tuple[str, object]]


@dataclass(frozen=True)
class ColumnMap:
    """Source column (or JSON key) read as prompt / chosen / rejected; None: the field's own name."""

    prompt: str | None = None
    chosen: str | None = None
    rejected: str | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """(target field, source column) for the three fields."""
        return [(target, getattr(self, target) or target) for target in ("prompt", "chosen", "rejected")]

    def rename(self, value: object) -> object:
        """A JSON record with the mapped keys read as prompt/chosen/rejected (anything else passes unchanged)."""
        moved = [(target, source) for target, source in self.pairs() if source != target]
        if not moved or not isinstance(value, dict):
            return value
        taken = {name for pair in moved for name in pair}
        record = {key: item for key, item in value.items() if key not in taken}
        record.update((target, value[source]) for target, source in moved if source in value)
        return record


@dataclass(frozen=True)
class Source:
    """One named stream of records, opened when read; `rows` is known up front for tables (the progress bar)."""

    name: str
    rows: int | None
    open: Callable[[], _Records]
    has_splits: bool = False


def read_sources(
    inputs: list[str],
    *,
    shape: Shape | None,
    skips: SkipLog,
    split: str | None = None,
    default_splits: tuple[str, ...] = TRAIN_SPLITS,
    columns: ColumnMap = ColumnMap(),
    desc: str = "read",
    score_field: str = "overall_score",
) -> ReadResult:
    """Every record of every input, in order, normalised by `formats.read_records`; bad ones go to `skips`.

    All inputs are opened (splits chosen, schemas checked) before any row is read, so a wrong path, split or
    column name fails at once.
    """
    if len({source for _, source in columns.pairs()}) < 3:
        raise InputError("--prompt_column, --chosen_column and --rejected_column must name three different columns")
    skipped: list[Path] = []
    sources = [source for name in inputs for source in open_input(name, split, default_splits, columns, skipped)]
    if split is not None and not any(source.has_splits for source in sources):
        flag = "--input_split" if default_splits == TRAIN_SPLITS else "--eval_split"
        raise InputError(f"{flag} {split}: none of the inputs has splits (files do not; dataset folders and names do)")
    table_rows = sum(source.rows or 0 for source in sources)
    with tqdm(total=table_rows, desc=desc, unit="row", disable=None if table_rows else True) as progress:
        streams = ((source.name, _counted(source, progress)) for source in sources)
        result = read_records(streams, shape=shape, skips=skips, score_field=score_field)
    result.skipped_folders = [str(folder) for folder in skipped]
    return result


def _counted(source: Source, progress: tqdm) -> _Records:
    for item in source.open():
        yield item
        if source.rows is not None:
            progress.update()


def _holds(path: Path, suffixes: tuple[str, ...]) -> bool:
    return any(p.is_file() and p.name.endswith(suffixes) for p in path.rglob("*"))


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def holds_splits(name: str) -> bool:
    """Whether an --input names a dataset with splits (a save_to_disk or Parquet dataset folder, or a dataset name):
    the same one may then serve as --input and --eval_input, with different splits."""
    path = Path(name)
    if path.is_dir():
        return _is_saved_dataset(path) or _holds(path, (".parquet",))
    return not path.exists() and bool(_DATASET_NAME.fullmatch(name))


def open_input(
    name: str, split: str | None, default_splits: tuple[str, ...], columns: ColumnMap,
    skipped_folders: list[Path] | None = None,
) -> list[Source]:
    """The sources of one `--input`, in reading order (see the module docstring for what an input is)."""
    path = Path(name)
    if path.is_file() and path.name.endswith(".parquet"):
        return [parquet_source(path, columns)]
    if path.is_dir() and _is_saved_dataset(path):
        return saved_dataset_sources(path, split, default_splits, columns)
    if path.is_dir() and _holds(path, (".parquet",)):
        if _holds(path, INPUT_SUFFIXES):
            raise InputError(f"{path}: holds both .parquet and JSON files: pass them as separate --input")
        return parquet_folder_sources(path, split, default_splits, columns)
    if not path.exists() and _DATASET_NAME.fullmatch(name) and not name.endswith((*INPUT_SUFFIXES, ".parquet")):
        return [named_dataset_source(name, split, default_splits, columns)]
    files = expand_inputs([name], skipped_folders=skipped_folders)
    return [Source(str(file), None, _json_opener(file, columns)) for file in files]


def _json_opener(path: Path, columns: ColumnMap) -> Callable[[], _Records]:
    return lambda: ((location, columns.rename(value)) for location, value in iter_records(path))


def choose_split(where: str, available: Iterable[str], split: str | None, defaults: tuple[str, ...]) -> str:
    """`split` if `where` has it; without one the first of `defaults` it has, else its only split."""
    names = sorted(available)
    if split is not None:
        if split not in names:
            raise InputError(f"{where}: no split {split!r} (splits: {', '.join(names)})")
        return split
    for candidate in defaults:
        if candidate in names:
            return candidate
    if len(names) == 1:
        return names[0]
    flag = "--input_split" if defaults == TRAIN_SPLITS else "--eval_split"
    raise InputError(f"{where}: several splits ({', '.join(names)}) and none of {', '.join(defaults)}: pass {flag}")


def _table_columns(where: str, schema_names: list[str], columns: ColumnMap) -> dict[str, str]:
    """source column -> field name, for the columns to read; an error naming what the table has if one is missing.
    A table of k-answer records (`responses` or `completions`, no `chosen`: data_prep.ranked) reads its own
    columns."""
    read: dict[str, str] = {}
    if columns.chosen is None and "chosen" not in schema_names and any(k in schema_names for k in ANSWER_KEYS):
        prompt = columns.prompt or "prompt"
        read = {name: name for name in RANKED_TABLE_COLUMNS if name in schema_names and name != prompt}
        if prompt in schema_names:
            read[prompt] = "prompt"
        return read
    for target, source in columns.pairs():
        if source in schema_names:
            read[source] = target
        elif target != "prompt" or getattr(columns, target) is not None:
            flag = f"--{target}_column"
            raise InputError(
                f"{where}: no column {source!r} (columns: {', '.join(schema_names)}); name it with {flag}"
            )
    if TOOLS_COLUMN in schema_names and TOOLS_COLUMN not in read:
        read[TOOLS_COLUMN] = TOOLS_COLUMN
    return read


def table_records(name: str, batches: Iterable[pa.RecordBatch | pa.Table], read: dict[str, str]) -> _Records:
    """("name:row", record) for each row of the batches: the `read` columns renamed, null cells left out."""
    row = 0
    for batch in batches:
        batch = batch.select(list(read)).rename_columns(list(read.values()))
        for record in batch.to_pylist():
            yield f"{name}:{row}", {key: value for key, value in record.items() if value is not None}
            row += 1


def parquet_source(path: Path, columns: ColumnMap) -> Source:
    try:
        # pre_buffer (pyarrow's default) would fetch every row group before the first batch: 1x the file in memory.
        file = pq.ParquetFile(path, pre_buffer=False)
    except (OSError, pa.ArrowException) as error:
        raise InputError(f"{path}: cannot read as Parquet: {error}") from error
    read = _table_columns(str(path), file.schema_arrow.names, columns)

    def records() -> _Records:
        try:
            yield from table_records(str(path), file.iter_batches(batch_size=BATCH_ROWS, columns=list(read)), read)
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"{path}: cannot read as Parquet: {error}") from error

    return Source(str(path), file.metadata.num_rows, records)


def parquet_folder_sources(
    path: Path, split: str | None, default_splits: tuple[str, ...], columns: ColumnMap
) -> list[Source]:
    try:
        data_files = datasets.load_dataset_builder(str(path)).config.data_files
    except Exception as error:  # noqa: BLE001 - datasets raises a dozen unrelated types for a folder it rejects
        raise InputError(f"{path}: cannot resolve its Parquet files and splits: {_one_line(error)}") from error
    chosen = choose_split(str(path), data_files, split, default_splits)
    files = [Path(file) for file in data_files[chosen]]
    others = [str(file) for file in files if not file.name.endswith(".parquet")]
    if others:
        raise InputError(f"{path}: split {chosen!r} holds files that are not Parquet: {', '.join(others[:3])}")
    return [replace(parquet_source(file, columns), has_splits=True) for file in files]


def saved_dataset_sources(
    path: Path, split: str | None, default_splits: tuple[str, ...], columns: ColumnMap
) -> list[Source]:
    """The Arrow shards of one split of a `save_to_disk` folder (DatasetDict or Dataset), in order."""
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits", [])
        folder = path / choose_split(str(path), splits, split, default_splits)
    else:
        state = _read_json(path / "state.json")
        choose_split(str(path), [state.get("_split") or "train"], split, default_splits)
        folder = path
    state = _read_json(folder / "state.json")
    if state.get("_indices_data_files"):
        raise InputError(f"{folder}: holds an indices mapping; save it again with save_to_disk (it flattens)")
    files = [folder / entry["filename"] for entry in state.get("_data_files", [])]
    return [replace(arrow_source(file, columns), has_splits=True) for file in files]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read: {error}") from error
    if not isinstance(value, dict):
        raise InputError(f"{path}: not a JSON object")
    return value


def arrow_source(path: Path, columns: ColumnMap) -> Source:
    """An Arrow IPC stream file as `datasets` writes it, memory-mapped: batches are read in place."""

    def reader() -> pa.ipc.RecordBatchStreamReader:
        try:
            return pa.ipc.open_stream(pa.memory_map(str(path)))
        except (OSError, pa.ArrowException) as error:
            raise InputError(f"{path}: cannot read as an Arrow stream: {error}") from error

    opened = reader()
    read = _table_columns(str(path), opened.schema.names, columns)
    rows = sum(batch.num_rows for batch in opened)  # headers only: the data stay in the memory map

    def records() -> _Records:
        batches = (
            batch.slice(start, BATCH_ROWS) for batch in reader() for start in range(0, batch.num_rows, BATCH_ROWS)
        )
        yield from table_records(str(path), batches, read)

    return Source(str(path), rows, records)


def named_dataset_source(name: str, split: str | None, default_splits: tuple[str, ...], columns: ColumnMap) -> Source:
    """`datasets.load_dataset(name)`: from the local cache offline, downloaded online."""
    try:
        if split is None:
            loaded = datasets.load_dataset(name)
            split = choose_split(name, loaded, None, default_splits)
            dataset = loaded[split]
        else:
            dataset = datasets.load_dataset(name, split=split)
    except InputError:
        raise
    except Exception as error:  # noqa: BLE001 - offline, missing, private, bad split: all "cannot load"
        raise InputError(
            f"{name}: no such file or directory, and datasets.load_dataset cannot load it: {_one_line(error)}"
        ) from error
    where = f"{name}[{split}]"
    read = _table_columns(where, dataset.column_names, columns)
    subset = dataset.select_columns(list(read)).with_format("arrow")
    records = lambda: table_records(where, subset.iter(batch_size=BATCH_ROWS), read)  # noqa: E731
    return Source(where, len(dataset), records, has_splits=True)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."
