"""Data-prep throughput: pairs/s per core for ~300-token pairs (prompt + chosen + rejected) with a fast BPE.

    python -m benchmarks.bench_prep [--pairs 20000] [--vocab_size 8000] [--json bench_prep.json]

Builds a byte-level BPE (8k vocabulary) on synthetic text, writes `--pairs` explicit records as JSON Lines and
measures, single-threaded (TOKENIZERS_PARALLELISM=false):
  tokenize   the tokenize stage alone (render, batched encode, boundary, EOS/BOS, truncation), with the exact
             fast path of `data_prep.fastpath` (what data prep uses for this tokenizer)
  tokenize/full  the same with `PairTokenizer(fast=False)`: every text encoded whole by the Rust tokenizer
             (the rule before the fast path; the outputs are checked equal)
  read/jsonl, read/parquet  reading and normalising the records alone, from the JSONL file and from the same
             records in a Parquet file (1,000-row groups, as `datasets` writes them)
  end2end    `python -m data_prep` in-process: read JSON, tokenize, write Arrow shards, report, hashes
  end2end/parquet  the same from the Parquet file (the outputs are checked equal)
  end2end/2  the same as end2end with --num_proc 2
"pairs/s/core" divides by the CPU seconds used (this process and its children), so it does not depend on
how many cores the machine has. The target is >= 3,000 pairs/s per core. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process: the figure is per core

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from datasets import load_from_disk  # noqa: E402

from data_prep.formats import SkipLog, read_inputs  # noqa: E402
from data_prep.prepare import main as prep_main  # noqa: E402
from data_prep.prepare import tokenize_pairs  # noqa: E402
from data_prep.sources import read_sources  # noqa: E402
from data_prep.tokenize import PairTokenizer  # noqa: E402
from demo.tiny import build_tokenizer  # noqa: E402

TARGET_PAIRS_PER_CORE = 3000


def synthetic_words(rng: random.Random, count: int) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9]
    weights += [1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(1, 9))) for _ in range(count)]


def sentence(rng: random.Random, words: list[str], length: int) -> str:
    # Zipf-like word frequencies, some punctuation: roughly what real text gives a BPE.
    picked = [words[min(int(rng.paretovariate(1.1)) - 1, len(words) - 1)] for _ in range(length)]
    return " ".join(word + ("," if rng.random() < 0.08 else "") for word in picked) + "."


def make_records(count: int, words: list[str], seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {
            "prompt": "Question: " + sentence(rng, words, 85) + "\nAnswer:",
            "chosen": " " + sentence(rng, words, 85),
            "rejected": " " + sentence(rng, words, 85),
        }
        for _ in range(count)
    ]


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(name: str, pairs: int, work: Callable[[], object]) -> dict[str, float | str | int]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    work()
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    return {
        "stage": name,
        "pairs": pairs,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "pairs_per_s": round(pairs / wall),
        "pairs_per_s_per_core": round(pairs / cpu),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.bench_prep [--pairs N] [--vocab_size V] [--json FILE]`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=20000, help="number of pairs to prepare")
    parser.add_argument("--vocab_size", type=int, default=8000, help="BPE vocabulary size")
    parser.add_argument("--json", type=Path, default=Path("bench_prep.json"), help="where to write the results")
    args = parser.parse_args(argv)

    words = synthetic_words(random.Random(0), 5000)
    rng = random.Random(2)
    corpus = [" ".join(rng.choices(words, k=200)) for _ in range(3000)]
    tokenizer = build_tokenizer(corpus, vocab_size=args.vocab_size)
    records = make_records(args.pairs, words, seed=1)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        tokenizer.save_pretrained(str(root / "tokenizer"))
        data = root / "pairs.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
        table = root / "pairs.parquet"
        pq.write_table(pa.Table.from_pylist(records), table, row_group_size=1000)
        pairs = read_inputs([str(data)], shape=None, skips=SkipLog()).pairs
        pair_tokenizer = PairTokenizer(tokenizer, max_length=1024, max_prompt_length=512)
        tokenized = tokenize_pairs(pairs[:1000], pair_tokenizer, skips=SkipLog())  # warm-up
        full_tokenizer = PairTokenizer(tokenizer, max_length=1024, max_prompt_length=512, fast=False)
        assert pair_tokenizer.fast_encoder is not None, "the fast path should apply to a plain byte-level BPE"
        tokenize_pairs(pairs[:1000], full_tokenizer, skips=SkipLog())  # warm-up
        outputs: dict[str, list] = {}
        results = [
            measure(
                label,
                len(pairs),
                lambda: outputs.__setitem__(label, tokenize_pairs(pairs, which, skips=SkipLog())),
            )
            for label, which in (("tokenize", pair_tokenizer), ("tokenize/full", full_tokenizer))
        ]
        assert outputs["tokenize"] == outputs["tokenize/full"], "the fast path changed the output"
        tokenized = tokenize_pairs(pairs[:2000], pair_tokenizer, skips=SkipLog())
        tokens = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized)
        for label, source in (("read/jsonl", data), ("read/parquet", table)):
            results.append(
                measure(label, len(pairs), lambda: read_sources([str(source)], shape=None, skips=SkipLog()))
            )
        base = ["--tokenizer", str(root / "tokenizer"), "--num_shards", "4"]
        for label, extra in (
            ("end2end", ["--input", str(data), "--num_proc", "1"]),
            ("end2end/parquet", ["--input", str(table), "--num_proc", "1"]),
            ("end2end/2", ["--input", str(data), "--num_proc", "2"]),
        ):
            output = root / label.replace("/", "_")
            results.append(measure(label, len(pairs), lambda: prep_main([*base, *extra, "--output", str(output)])))
        outputs_of = ("end2end", "end2end_parquet")
        from_json, from_parquet = (load_from_disk(str(root / name / "train"))[:] for name in outputs_of)
        assert from_json == from_parquet, "Parquet and JSONL inputs gave different shards"

    summary = {
        "tokens_per_pair": round(tokens / len(tokenized), 1),
        "vocab_size": len(tokenizer),
        "target_pairs_per_s_per_core": TARGET_PAIRS_PER_CORE,
        "results": results,
    }
    print(f"\n{summary['tokens_per_pair']} tokens per pair (prompt + chosen + rejected), vocab {len(tokenizer)}")
    print(f"{'stage':<16} {'pairs':>7} {'wall s':>8} {'cpu s':>8} {'pairs/s':>9} {'pairs/s/core':>13}")
    for row in results:
        print(
            f"{row['stage']:<16} {row['pairs']:>7} {row['wall_s']:>8} {row['cpu_s']:>8} "
            f"{row['pairs_per_s']:>9} {row['pairs_per_s_per_core']:>13}"
        )
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
