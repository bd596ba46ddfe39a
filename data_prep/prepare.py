"""Data prep: raw preference records -> tokenized Arrow shards + prep_report.json, written atomically.

Records come from JSON/JSONL files, Parquet files and folders, `datasets` folders or dataset names
(`data_prep.sources`), all normalised alike (`data_prep.formats`).

    python -m data_prep --input PATH [--input PATH ...] --tokenizer PATH --output DIR [options]
    dpo-prep --input data/dpo.jsonl --tokenizer tok/ --output prepped/ --eval_fraction 0.05 --num_shards 4
    ./launch.sh prep ...

DIR afterwards holds
    train/, eval/       `datasets.save_to_disk` shards; columns prompt_ids, chosen_ids, rejected_ids (list<int32>,
                        responses without the prompt, each ending in one EOS) and source_index (int64, the
                        record's number among the records read for that split); data with k > 2 scored answers
                        per prompt adds responses_ids (list<list<int32>>, input order) and scores (list<float64>),
                        its pairwise columns holding the best and the worst answer (data_prep.ranked)
    tokenizer/          the tokenizer, `save_pretrained` (pad token set to EOS when it had none)
    prep_report.json    counts, skip reasons with `file:line` examples, token-length statistics, and the hashes
                        training verifies the data with (`dpo.contract`)

Safety. `--output` may not be, contain or lie inside any input; `--overwrite` replaces only a previous data_prep
output (one holding `prep_report.json` and nothing else of the user's); staging folders of killed runs beside
`--output` are cleaned, and an interrupted replacement is undone, when the command is run again (`dpo.atomic`).
Tokenizers load from local folders (or the local Hugging Face cache) only: nothing is downloaded. Eval inputs that
overlap the train inputs, or whose every prompt is also a training prompt, are refused; a partial prompt overlap is
warned about and counted (`eval_prompts_in_train`). `--seed` without `--eval_fraction` is an error.

Exit status: 0 done; 2 a user error, one stderr line: a usage error, an input, tokenizer or output problem, or a
bad record under `--on_bad_record error` ("file:line: reason: detail"). Anything else is a bug and shows its
traceback (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, List, Value
from tqdm import tqdm

from data_prep.formats import (
    SHAPES,
    BadRecord,
    BadRecordError,
    InputError,
    PreferencePair,
    SkipLog,
)
from data_prep.outputs import OutputError, check_not_overlapping, check_output
from data_prep.ranked import RANKED_COLUMNS, TokenizedRanked, answer_counts, as_ranked
from data_prep.sources import EVAL_SPLITS, ColumnMap, holds_splits, read_sources
from data_prep.tokenize import PairTokenizer, TokenizedPair
from data_prep.tokenizer_source import load_tokenizer
from dpo.atomic import recover, staged_folder, write_text_atomic
from dpo.contract import PREP_FEATURES, REPORT_NAME, TOKEN_COLUMNS, stamp_report
from dpo.progress import quiet_library_progress


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line (no usage block), exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _TypedDefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows each option's type as its placeholder (`--max_length INT`) and its default."""

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return {int: "INT", float: "FLOAT", Path: "PATH"}.get(action.type, "STR")

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return f"{action.help} (required)"
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _OneLineParser(prog="python -m data_prep", description=__doc__.split("\n")[0],
                            formatter_class=_TypedDefaultsFormatter)
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        help="a .json/.jsonl(.gz) or .parquet file, a directory, a save_to_disk folder or a dataset name",
    )
    parser.add_argument("--input_split", help="split of dataset folders/names (default: train, train_prefs, the one)")
    parser.add_argument("--eval_split", help="split of --eval_input folders/names (default: test, test_prefs, ...)")
    for field in ("prompt", "chosen", "rejected"):
        parser.add_argument(f"--{field}_column", help=f"column (or JSON key) read as {field} (default: {field})")
    parser.add_argument("--score_field", default="overall_score",
                        help="key of the score in UltraFeedback-style 'completions' (ranked records)")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (or name) for AutoTokenizer")
    parser.add_argument("--output", required=True, type=Path, help="output directory, written atomically")
    parser.add_argument(
        "--format", choices=("auto", *SHAPES), default="auto", help="record shape (auto: detect per file)"
    )
    parser.add_argument(
        "--chat_template", type=Path, help="Jinja chat template file, overrides the tokenizer's"
    )
    parser.add_argument(
        "--max_length", type=int, default=1024, help="max prompt + response tokens, each side"
    )
    parser.add_argument("--max_prompt_length", type=int, help="max prompt tokens (none: max_length // 2)")
    parser.add_argument(
        "--on_bad_record",
        choices=("skip", "error"),
        default="skip",
        help="skip and count, or stop with exit 2",
    )
    parser.add_argument("--eval_fraction", type=float, default=0.0, help="share of pairs held out for eval/")
    parser.add_argument("--eval_input", action="append", help="eval records from these files instead")
    parser.add_argument("--seed", type=int, help="seed of the --eval_fraction split (default: 0)")
    parser.add_argument(
        "--num_shards", type=int, default=1, help="Arrow shards per split (at most one per pair)"
    )
    parser.add_argument("--num_proc", type=int, default=1, help="tokenizer processes")
    parser.add_argument("--batch_size", type=int, default=1000, help="pairs per tokenizer batch")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = parser.parse_args(argv)
    if args.max_prompt_length is None:
        args.max_prompt_length = args.max_length // 2
    if not 1 <= args.max_prompt_length < args.max_length:
        parser.error("need 1 <= --max_prompt_length < --max_length")
    if not 0.0 <= args.eval_fraction < 1.0:
        parser.error("--eval_fraction must be in [0, 1)")
    if args.eval_fraction > 0 and args.eval_input:
        parser.error("use --eval_fraction or --eval_input, not both")
    if args.eval_split and not args.eval_input:
        parser.error("--eval_split needs --eval_input (the same folder or name as --input, for instance)")
    if args.seed is not None and args.eval_fraction == 0:
        parser.error("--seed only seeds the --eval_fraction split: without --eval_fraction it would do nothing")
    if args.eval_fraction > 0 and args.seed is None:
        args.seed = 0
    for name in ("num_shards", "num_proc", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


_WORKER: PairTokenizer | None = None


def _init_worker(pair_tokenizer: PairTokenizer) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER = pair_tokenizer


def _tokenize_chunk(chunk: list[PreferencePair]) -> list[TokenizedPair | BadRecord]:
    assert _WORKER is not None
    return _WORKER(chunk)


def tokenize_pairs(
    pairs: list[PreferencePair],
    pair_tokenizer: PairTokenizer,
    *,
    skips: SkipLog,
    num_proc: int = 1,
    batch_size: int = 1000,
    desc: str = "tokenize",
) -> list[TokenizedPair]:
    """Tokenize in batches (in `num_proc` processes), keeping input order; dropped pairs go to `skips`."""
    chunks = [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]
    kept: list[TokenizedPair] = []
    with tqdm(total=len(pairs), desc=desc, unit="pair", disable=None) as progress:
        if num_proc > 1 and len(chunks) > 1:
            # Not fork: forked from a threaded process (torch, a trainer preparing its recipe data), a worker can
            # inherit a lock another thread held and hang (seen in CI inside dpo.train).
            context = multiprocessing.get_context("forkserver")
            with context.Pool(min(num_proc, len(chunks)), _init_worker, (pair_tokenizer,)) as pool:
                results: Iterator[list[TokenizedPair | BadRecord]] = pool.imap(_tokenize_chunk, chunks)
                _collect(results, kept, skips, progress)
        else:
            _collect(map(pair_tokenizer, chunks), kept, skips, progress)
    return kept


def _collect(
    results: Iterator[list[TokenizedPair | BadRecord]],
    kept: list[TokenizedPair],
    skips: SkipLog,
    progress: tqdm,
) -> None:
    for chunk in results:
        for result in chunk:
            if isinstance(result, BadRecord):
                skips.add(result)
            else:
                kept.append(result)
        progress.update(len(chunk))


def split_eval(
    pairs: list[TokenizedPair], *, fraction: float, seed: int
) -> tuple[list[TokenizedPair], list[TokenizedPair]]:
    """(train, eval): whole prompt groups move to eval until it holds at least round(fraction * n) pairs (>= 1).

    Groups are taken in the order of a seeded hash of their prompt ids, so the split depends only on the data
    and the seed, and pairs that share a prompt never straddle train and eval. Both keep input order.
    """
    groups: dict[bytes, list[int]] = {}
    for number, pair in enumerate(pairs):
        groups.setdefault(np.asarray(pair.prompt_ids, dtype="<i8").tobytes(), []).append(number)
    key = str(seed).encode()
    order = sorted(
        groups, key=lambda prompt: (hashlib.blake2b(prompt, key=key, digest_size=8).digest(), prompt)
    )
    target = max(1, round(fraction * len(pairs)))
    held_out: set[int] = set()
    for prompt in order:
        if len(held_out) >= target:
            break
        held_out.update(groups[prompt])
    train = [pair for number, pair in enumerate(pairs) if number not in held_out]
    evaluation = [pair for number, pair in enumerate(pairs) if number in held_out]
    if not train:
        raise InputError(
            f"--eval_fraction {fraction} leaves no training pairs ({len(pairs)} pairs, one prompt group)"
        )
    return train, evaluation


def to_dataset(pairs: list[TokenizedPair], *, ranked: bool = False) -> Dataset:
    """A split's shards; `ranked`: with each record's answers and scores too (`data_prep.ranked`)."""
    if ranked:
        return ranked_dataset([as_ranked(pair) for pair in pairs])
    columns = {
        "prompt_ids": [pair.prompt_ids for pair in pairs],
        "chosen_ids": [pair.chosen_ids for pair in pairs],
        "rejected_ids": [pair.rejected_ids for pair in pairs],
        "source_index": [pair.index for pair in pairs],
    }
    return Dataset.from_dict(columns, features=PREP_FEATURES)


def ranked_dataset(records: list[TokenizedRanked]) -> Dataset:
    """A ranked split: data_prep's pairwise columns (best and worst answer) plus `responses_ids` and `scores`."""
    features = Features({**PREP_FEATURES, "responses_ids": List(List(Value("int32"))),
                         "scores": List(Value("float64"))})
    return Dataset.from_dict({
        "prompt_ids": [r.prompt_ids for r in records], "chosen_ids": [r.chosen_ids for r in records],
        "rejected_ids": [r.rejected_ids for r in records], "source_index": [r.index for r in records],
        "responses_ids": [r.responses_ids for r in records], "scores": [r.scores for r in records]},
        features=features)


def length_stats(lengths: list[int]) -> dict[str, float]:
    values = np.asarray(lengths, dtype=np.float64)
    return {
        "mean": round(float(values.mean()), 2),
        "p50": round(float(np.percentile(values, 50)), 2),
        "p95": round(float(np.percentile(values, 95)), 2),
        "max": int(values.max()),
    }


def write_split(path: Path, dataset: Dataset, num_shards: int) -> int:
    """Save one split in `min(num_shards, rows)` shards; returns the shard count."""
    shards = max(1, min(num_shards, len(dataset)))
    dataset.save_to_disk(str(path), num_shards=shards)
    return shards


def _read_split(
    inputs: list[str], shape: str, skips: SkipLog, formats: dict[str, str], skipped_folders: list[str],
    **source_options: object,
) -> tuple[list[PreferencePair], int]:
    shape_or_none = None if shape == "auto" else shape
    result = read_sources(inputs, shape=shape_or_none, skips=skips, **source_options)  # type: ignore[arg-type]
    formats.update(result.formats)
    skipped_folders += result.skipped_folders
    if result.records_read == 0:
        raise InputError(f"no records in {', '.join(inputs)}")
    return result.pairs, result.records_read


def check_paths(args: argparse.Namespace) -> None:
    """Refuse, before anything is read or touched, an output among the inputs and eval inputs among the train ones."""
    inputs = {"--input": args.input, "--eval_input": args.eval_input or []}
    if Path(args.tokenizer).expanduser().exists():
        inputs["--tokenizer"] = [args.tokenizer]
    if args.chat_template is not None:
        inputs["--chat_template"] = [str(args.chat_template)]
    check_not_overlapping(args.output, inputs)
    for eval_name in args.eval_input or []:
        eval_path = Path(eval_name).resolve()
        for train_name in args.input:
            train_path = Path(train_name).resolve()
            if eval_path == train_path and holds_splits(train_name) and (
                    args.eval_split is None or args.eval_split != args.input_split):
                continue  # one dataset, two splits (train_prefs / test_prefs): the prompt overlap check still runs
            if eval_path.is_relative_to(train_path) or train_path.is_relative_to(eval_path):
                raise InputError(
                    f"--eval_input {eval_name} overlaps --input {train_name}: the eval pairs would be training "
                    "pairs; pass held-out files, or use --eval_fraction"
                )


def eval_prompts_in_train(train: list[TokenizedPair], evaluation: list[TokenizedPair]) -> int:
    """How many eval pairs have a prompt (token ids) that some training pair has too."""
    seen = {tuple(pair.prompt_ids) for pair in train}
    return sum(tuple(pair.prompt_ids) in seen for pair in evaluation)


def run(args: argparse.Namespace, notes: list[str] | None = None) -> dict:
    """The whole stage; returns the report that was written. Lines the user should see go to `notes`."""
    notes = [] if notes is None else notes
    quiet_library_progress()  # in a log file: no "Saving the dataset" bars from datasets
    check_paths(args)
    notes += recover(args.output)
    check_output(args.output, overwrite=args.overwrite)
    tokenizer, pad_added = load_tokenizer(args.tokenizer, args.chat_template)
    pair_tokenizer = PairTokenizer(
        tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length
    )
    skips = SkipLog(strict=args.on_bad_record == "error")
    formats: dict[str, str] = {}
    columns = ColumnMap(args.prompt_column, args.chosen_column, args.rejected_column)
    skipped_folders: list[str] = []
    raw = {"train": _read_split(args.input, args.format, skips, formats, skipped_folders, split=args.input_split,
                                columns=columns, score_field=args.score_field)}
    if args.eval_input:
        raw["eval"] = _read_split(
            args.eval_input, args.format, skips, formats, skipped_folders,
            split=args.eval_split, default_splits=EVAL_SPLITS, columns=columns, desc="read eval",
            score_field=args.score_field,
        )
    notes += [f"not read: {folder} (written by data_prep, not raw input)" for folder in skipped_folders]
    needs_template = any(pair.shape == "conversational" for pairs, _ in raw.values() for pair in pairs)
    if needs_template and not tokenizer.chat_template:
        raise InputError(
            "conversational records need a chat template: the tokenizer has none, pass --chat_template"
        )
    common = {"skips": skips, "num_proc": args.num_proc, "batch_size": args.batch_size}
    splits = {
        name: tokenize_pairs(pairs, pair_tokenizer, desc=name, **common) for name, (pairs, _) in raw.items()
    }
    for name, pairs in splits.items():
        if not pairs:
            raise InputError(f"no {name} pair survived ({skips.total} skipped: {_nonzero(skips.counts)})")
    if args.eval_fraction > 0:
        splits["train"], splits["eval"] = split_eval(
            splits["train"], fraction=args.eval_fraction, seed=args.seed
        )
    shared_prompts = eval_prompts_in_train(splits["train"], splits.get("eval", []))
    if shared_prompts and shared_prompts == len(splits["eval"]):
        raise InputError(
            f"every eval prompt ({shared_prompts}) is also a training prompt: the --eval_input files repeat the "
            "training data; pass held-out files, or use --eval_fraction"
        )
    if shared_prompts:
        notes.append(f"warning: {shared_prompts} of {len(splits['eval'])} eval pairs have a training prompt")
    # One record with k answers makes the data ranked: every split then carries answers and scores (a pair as
    # two answers scored [1, 0]); data with pairs only is written exactly as before.
    ranked = any(isinstance(pair, TokenizedRanked) for pairs in splits.values() for pair in pairs)
    datasets = {name: to_dataset(pairs, ranked=ranked) for name, pairs in splits.items()}
    written = [as_ranked(pair) if ranked else pair for pairs in splits.values() for pair in pairs]
    report = {
        "records_read": sum(count for _, count in raw.values()),
        "pairs_written": {"train": len(splits["train"]), "eval": len(splits.get("eval", []))},
        "skipped": skips.counts,
        "skipped_examples": skips.examples,
        "truncated_pairs": sum(pair.truncated for pair in written),  # both splits, as before the split counts
        "truncated_pairs_by_split": {"train": sum(pair.truncated for pair in splits["train"]),
                                     "eval": sum(pair.truncated for pair in splits.get("eval", []))},
        "boundary_adjusted": sum(pair.boundary_adjusted for pair in written),
        "format": formats,
        "tokenizer": {
            "name_or_path": args.tokenizer,
            "hash": None,  # filled in from the saved copy below (stamp_report)
            "chat_template": str(args.chat_template) if args.chat_template else "tokenizer",
            "pad_token_set_to_eos": pad_added,
        },
        "max_length": args.max_length,
        "max_prompt_length": args.max_prompt_length,
        "token_lengths": {
            "prompt": length_stats([len(pair.prompt_ids) for pair in written]),
            "response": length_stats(
                [len(ids) for pair in written
                 for ids in (pair.responses_ids if ranked else (pair.chosen_ids, pair.rejected_ids))]
            ),
        },
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "prompt_starts_with_bos": pair_tokenizer.special.adds_bos,
        "columns": [*TOKEN_COLUMNS, "source_index", *(RANKED_COLUMNS if ranked else ())],
        "inputs": {"train": args.input, "eval": args.eval_input or []},
        "split": {"eval_fraction": args.eval_fraction, "seed": args.seed},
        "eval_prompts_in_train": shared_prompts,
        "skipped_folders": skipped_folders,
    }
    if ranked:
        report["answers_per_prompt"] = answer_counts(written)

    def may_replace(output: Path) -> None:  # again at the rename: the folder may have changed meanwhile
        check_output(output, overwrite=args.overwrite)

    try:
        with staged_folder(args.output, may_replace=may_replace) as staging:
            report["num_shards"] = {
                name: write_split(staging / name, data, args.num_shards) for name, data in datasets.items()
            }
            tokenizer.save_pretrained(str(staging / "tokenizer"))
            stamp_report(report, staging)  # the hashes training checks, of what was written (dpo.contract)
            # Written last: a folder with a report is complete even before the rename.
            write_text_atomic(staging / REPORT_NAME, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    except OSError as error:  # disk full, no permission: nothing was replaced, the staging folder is gone
        raise OutputError(f"--output {args.output}: cannot write: {error}") from error
    return report


def _nonzero(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason}={count}" for reason, count in counts.items() if count) or "none"


def _print_notes(notes: list[str]) -> None:
    for note in notes:
        print(f"data_prep: {note}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """`python -m data_prep --input PATH --tokenizer PATH --output DIR [options]`; returns the exit status."""
    args = parse_args(argv)
    notes: list[str] = []
    try:
        report = run(args, notes)
    except BadRecordError as error:
        _print_notes(notes)
        print(str(error).replace("\n", " "), file=sys.stderr)
        return 2
    except (InputError, OutputError) as error:
        _print_notes(notes)
        print(f"error: {error}".replace("\n", " "), file=sys.stderr)
        return 2
    _print_notes(notes)
    written = report["pairs_written"]
    print(
        f"wrote {written['train']} train and {written['eval']} eval pairs to {args.output} "
        f"from {report['records_read']} records (skipped: {_nonzero(report['skipped'])})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
