"""Raw data named in the recipe, prepared once: `dataset_mixture` -> a data_prep folder in a cache, reused after.

    cfg = prepare_recipe_data(cfg, accelerator, log)   # in dpo.train, before anything reads cfg.data_path

The mixture is alignment-handbook's form (TRL's `dataset_name` and the older `dataset_mixer` are translated to it
by dpo/trl_names.py), plus `eval_datasets` (held out whole):

    dataset_mixture:
      datasets:                      # mixed into the training data
        - {id: PATH_OR_NAME, config: default, split: train_prefs, columns: [chosen, rejected], weight: 0.5}
      eval_datasets: [...]           # optional: held out whole
      test_split_size: 2000          # optional: rows (>= 1) or a share (< 1) of the mixed rows held out for eval
      seed: 0                        # the weighted sampling and the held-out rows

`id` is any input `data_prep --input` takes (a save_to_disk or Parquet dataset folder, JSON files, a dataset name
in the local cache); a `config` other than default is a sub-folder of that name. A weight w < 1 keeps
int(w x rows) rows of a seeded permutation (alignment-handbook's rule); `columns` limits the columns read.

The cache entry is named by a hash of: the mixture, the content of every input file, the tokenizer (chat template
included), the prep options (max_length, max_prompt_length) and the data_prep code. A complete entry (its
`recipe_data.json` is written last) is reused; the main process prepares, the others wait at a barrier and then
read it (a process on another node whose cache is not shared prepares its own copy, once per node).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np

import data_prep
from data_prep import prepare as data_prep_run
from data_prep.formats import BadRecordError, InputError
from data_prep.outputs import OutputError
from data_prep.sources import TRAIN_SPLITS, ColumnMap, open_input
from data_prep.tokenizer_source import load_tokenizer
from dpo.atomic import write_text_atomic
from dpo.contract import tokenizer_sha256
from dpo.errors import UserError
from dpo.fingerprint import file_sha256
from dpo.mixture import Mixture, MixtureError, SourceSpec, parse_mixture
from dpo.startup import check_output_dir

RECORD_NAME = "recipe_data.json"
DEFAULT_MAX_LENGTH = 1024


# ------------------------------------------------------------------------------------------ reading the rows


def _input_name(spec: SourceSpec) -> str:
    """The data_prep input of a source: a `config` other than default is a sub-folder of a local dataset."""
    if spec.config in (None, "default"):
        return spec.id
    sub = Path(spec.id) / spec.config
    if sub.is_dir():
        return str(sub)
    raise MixtureError(f"dataset_mixture: {spec.id} config {spec.config!r}: no sub-folder {sub} (a local copy keeps "
                       f"each config in a folder of its name)")


def read_rows(spec: SourceSpec) -> list[dict[str, Any]]:
    """Every row of one source (its chosen split), limited to its `columns`."""
    name = _input_name(spec)
    try:
        sources = open_input(name, spec.split, TRAIN_SPLITS, ColumnMap())
        if spec.split not in (None, "train") and not any(source.has_splits for source in sources):
            raise InputError(f"{name}: files have no splits, so split {spec.split!r} cannot be chosen")
        rows = [record for source in sources for _, record in source.open()]
    except InputError as error:
        raise MixtureError(f"dataset_mixture: {error}") from None
    if spec.columns is not None:
        keep = set(spec.columns)
        rows = [{k: v for k, v in row.items() if k in keep} if isinstance(row, dict) else row for row in rows]
    return rows


def weighted_rows(rows: list[Any], weight: float | None, seed: int) -> list[int]:
    """Indices kept: all, or the first int(weight x n) of a permutation seeded by `seed`, in their original order."""
    if weight is None or weight >= 1:
        return list(range(len(rows)))
    order = np.random.default_rng(seed).permutation(len(rows))
    return sorted(order[: int(len(rows) * weight)].tolist())


def held_out(total: int, size: float | None, seed: int) -> set[int]:
    """Positions of the mixed rows held out for eval: `size` rows (>= 1) or that share (< 1), seeded."""
    if not size:
        return set()
    count = int(size) if size >= 1 else max(1, round(size * total))
    if count >= total:
        raise MixtureError(f"dataset_mixture.test_split_size {size:g} leaves no training rows ({total} rows)")
    return set(np.random.default_rng(seed + 1).permutation(total)[:count].tolist())


# ---------------------------------------------------------------------------------------------- the cache key


def _path_digest(name: str) -> str:
    path = Path(name)
    if path.is_file():
        return file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\0".encode())
        return digest.hexdigest()
    return f"name:{name}"  # a dataset name: its cached copy is keyed by datasets itself


def _code_digest() -> str:
    digest = hashlib.sha256()
    for file in sorted(Path(data_prep.__file__).parent.glob("*.py")):
        digest.update(file.read_bytes())
    return digest.hexdigest()


def cache_key(mixture: Mixture, options: Mapping[str, Any], tokenizer_hash: str) -> str:
    sources = [*mixture.datasets, *mixture.eval_datasets]
    material = {
        "mixture": dataclasses.asdict(mixture),
        "inputs": {s.label + f"/{s.config}": _path_digest(_input_name(s)) for s in sources},
        "tokenizer": tokenizer_hash,
        "options": dict(options),
        "data_prep": _code_digest(),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


def cache_root(cfg: Any) -> Path:
    root = cfg.data_cache_dir or os.environ.get("DPO_DATA_CACHE") or Path.home() / ".cache" / "dpo-pipeline" / "data"
    return Path(root).expanduser()


# ------------------------------------------------------------------------------------------------ preparing


def prep_options(cfg: Any) -> dict[str, Any]:
    max_length = cfg.max_length or DEFAULT_MAX_LENGTH
    return {"max_length": max_length, "max_prompt_length": cfg.max_prompt_length or max_length // 2}


def _write_jsonl(path: Path, rows: list[Any]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows),
                    encoding="utf-8")


def materialise(mixture: Mixture, folder: Path) -> list[dict[str, Any]]:
    """The mixed rows as JSON Lines, one file per source and split (so data prep detects each one's shape);
    returns one entry per file: source, split (train/eval), rows, file."""
    files: list[dict[str, Any]] = []
    mixed: list[tuple[int, Any]] = []  # (source number, row) of the weighted training sources
    read = {spec: read_rows(spec) for spec in dict.fromkeys([*mixture.datasets, *mixture.eval_datasets])}
    for number, spec in enumerate(mixture.datasets):
        rows = read[spec]
        mixed += [(number, rows[i]) for i in weighted_rows(rows, spec.weight, mixture.seed)]
    held = held_out(len(mixed), mixture.test_split_size, mixture.seed)
    parts: dict[tuple[str, int], list[Any]] = {}
    for position, (number, row) in enumerate(mixed):
        parts.setdefault(("eval" if position in held else "train", number), []).append(row)
    for number, spec in enumerate(mixture.eval_datasets):
        parts[("eval", len(mixture.datasets) + number)] = read[spec]
    specs = [*mixture.datasets, *mixture.eval_datasets]
    for (split, number), rows in sorted(parts.items()):
        file = folder / f"{split}-{number:03d}.jsonl"
        _write_jsonl(file, rows)
        spec = specs[number]
        files.append({"source": spec.label, "weight": spec.weight, "split": split, "rows": len(rows),
                      "file": str(file)})
    return files


def _pairs_per_file(entry: Path, files: list[dict[str, Any]]) -> None:
    """Each file's written pairs, from the source_index column (the record's number among its split's records,
    in input order)."""
    for split in ("train", "eval"):
        mine = [f for f in files if f["split"] == split]
        if not mine:
            continue
        indices = np.asarray(datasets.load_from_disk(str(entry / split))["source_index"], dtype=np.int64)
        bounds = np.cumsum([0] + [f["rows"] for f in mine])
        counts = np.histogram(indices, bins=bounds)[0] if len(indices) else np.zeros(len(mine), dtype=np.int64)
        for file, count in zip(mine, counts):
            file["pairs"] = int(count)


def prepare(cfg: Any, mixture: Mixture, entry: Path, tokenizer_hash: str) -> dict[str, Any]:
    """Run data prep on the mixture into `entry`; returns the record written beside its report."""
    raw = entry.with_name(f".raw-{entry.name}")
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    try:
        files = materialise(mixture, raw)
        options = prep_options(cfg)
        argv = [arg for f in files if f["split"] == "train" for arg in ("--input", f["file"])]
        argv += [arg for f in files if f["split"] == "eval" for arg in ("--eval_input", f["file"])]
        argv += ["--tokenizer", cfg.model_path, "--output", str(entry), "--overwrite",
                 "--max_length", str(options["max_length"]), "--max_prompt_length", str(options["max_prompt_length"]),
                 "--num_proc", str(cfg.dataset_num_proc or 1)]
        notes: list[str] = []
        try:
            report = data_prep_run.run(data_prep_run.parse_args(argv), notes)
        except (InputError, OutputError, BadRecordError) as error:
            raise UserError(f"data prep of the recipe's dataset_mixture: {error}") from None
    finally:
        shutil.rmtree(raw, ignore_errors=True)
    _pairs_per_file(entry, files)
    for file in files:
        file.pop("file")
    record = {"dataset_mixture": dataclasses.asdict(mixture), "options": options, "tokenizer_hash": tokenizer_hash,
              "sources": files, "notes": notes, "pairs_written": report["pairs_written"],
              "records_read": report["records_read"],
              "skipped": {k: v for k, v in report["skipped"].items() if v}}
    write_text_atomic(entry / RECORD_NAME, json.dumps(record, indent=2) + "\n")  # last: the entry is complete
    return record


def summary(record: Mapping[str, Any]) -> str:
    written = record["pairs_written"]
    per_source: dict[str, dict[str, int]] = {}
    for file in record["sources"]:
        per_source.setdefault(file["source"], {}).setdefault(file["split"], 0)
        per_source[file["source"]][file["split"]] += file["pairs"]
    parts = [f"{name} " + " + ".join(f"{n} {split}" for split, n in splits.items())
             for name, splits in per_source.items()]
    skipped = ", ".join(f"{k}={v}" for k, v in record["skipped"].items()) or "none"
    return (f"[dpo] data: {written['train']} train and {written['eval']} eval pairs from {record['records_read']} "
            f"records (skipped: {skipped}); per source: {'; '.join(parts)}")


def ensure_prepared(cfg: Any, log: Callable[[str], None]) -> Path:
    """The cache entry of cfg's mixture: reused when complete, else prepared now."""
    mixture = parse_mixture(cfg.dataset_mixture)
    try:
        tokenizer, _ = load_tokenizer(cfg.model_path, None)
    except InputError as error:
        raise UserError(f"model_path: {error}") from None
    entry = cache_root(cfg) / cache_key(mixture, prep_options(cfg), tokenizer_sha256(tokenizer))
    if (entry / RECORD_NAME).is_file():
        log(f"[dpo] data: reused {entry} (prepared from the recipe's dataset_mixture earlier)")
        record = json.loads((entry / RECORD_NAME).read_text())
    else:
        entry.parent.mkdir(parents=True, exist_ok=True)
        record = prepare(cfg, mixture, entry, tokenizer_sha256(tokenizer))
        log(f"[dpo] data: prepared {entry} from the recipe's dataset_mixture (report: {entry / 'prep_report.json'})")
    for note in record.get("notes", []):
        log(f"[dpo] data prep: {note}")
    log(summary(record))
    return entry


def check_prepared_lengths(cfg: Any) -> None:
    """max_length / max_prompt_length given with a prepared folder must be what it was prepared with."""
    path = Path(cfg.data_path) / "prep_report.json"
    if not path.is_file():
        return
    report = json.loads(path.read_text())
    for key in ("max_length", "max_prompt_length"):
        wanted = getattr(cfg, key)
        if wanted is not None and report.get(key) is not None and wanted != report[key]:
            raise UserError(f"{key}: {wanted} but {cfg.data_path} was prepared with {key} {report[key]}; prepare it "
                            f"again with --{key} {wanted}, or drop {key} from the recipe")


def prepare_recipe_data(cfg: Any, accelerator: Any, log: Callable[[str], None]) -> Any:
    """cfg with data_path set to the prepared mixture (prepared once: main process first, then once per node whose
    cache the main process could not see); unchanged when the recipe names a prepared folder."""
    if cfg.dataset_mixture is None:
        if cfg.data_path:
            check_prepared_lengths(cfg)
        return cfg
    check_output_dir(cfg)  # before minutes of data prep, not after
    entry: Path | None = None
    if accelerator.is_main_process:
        entry = ensure_prepared(cfg, log)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and accelerator.is_local_main_process:
        entry = ensure_prepared(cfg, lambda *_: None)  # reused, or prepared on this node's own disk
    accelerator.wait_for_everyone()
    if entry is None:
        entry = ensure_prepared(cfg, lambda *_: None)  # complete by now: only reads
    return dataclasses.replace(cfg, data_path=str(entry), dataset_mixture=None)
