"""Attention-mask memory per batch: the dense masks of sdpa/eager against FlexAttention's block masks.

    python -m benchmarks.bench_masks [--lengths 2048,8192,32768] [--output bench_results/masks.json]

For one row of T tokens in the default layout (one long prefix-shared pair: prompt 3/4 of T, two answers of T/8),
both forms are built by the collate
functions' own code (`dpo.masks.build_attention_mask`), once for a model with one kind of attention layer and once
for one with full and sliding-window layers (Gemma 2/3, OLMo 3 ...: one mask per rule), and their bytes counted
(`dpo.masks.mask_bytes`: the dense [R, 1, T, T] float32 tensors; the block form's three [R, T] tensors and its
BlockMasks' block tables). Dense grows as T^2 (4 bytes per entry), block as T + (T / 128)^2. The block masks are
built on the CPU here (the GPU path builds them compiled, on the device; the stored sizes are the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.measure import hardware
from dpo.masks import AttentionSpec, MaskRule, build_attention_mask, mask_bytes
from dpo.prefix_sharing import collate_prefix_shared

SPECS = {
    "one rule": AttentionSpec(),
    "full + sliding 4096": AttentionSpec(rules=(("full_attention", MaskRule()),
                                                ("sliding_attention", MaskRule(window=4096)))),
}


def row_pairs(length: int) -> list[dict[str, list[int]]]:
    """One long pair that fills a prefix-shared row of exactly `length` tokens (prompt + chosen + rejected + 1)."""
    answer = length // 8
    prompt = length - 2 * answer - 1
    return [{"prompt_ids": [5] * prompt, "chosen_ids": [6] * answer, "rejected_ids": [7] * answer}]


def measure(length: int, spec: AttentionSpec, *, dense: bool) -> dict[str, Any]:
    batch = collate_prefix_shared(row_pairs(length), pad_token_id=0, max_tokens_per_row=length, attention=spec,
                                  mask_form="block")
    segment_mask = batch.attention_mask
    row = {"tokens_per_row": int(batch.input_ids.shape[1]), "rows": int(batch.input_ids.shape[0])}
    started = time.perf_counter()
    row["block_bytes"] = mask_bytes(segment_mask)
    row["block_build_s"] = time.perf_counter() - started
    if dense:
        started = time.perf_counter()
        full = build_attention_mask(segment_mask.segment, segment_mask.branch, segment_mask.position_ids, spec)
        row["dense_bytes"] = mask_bytes(full)
        row["dense_build_s"] = time.perf_counter() - started
        del full
    else:  # not built: T^2 float32 per distinct rule, what build_attention_mask would allocate
        row["dense_bytes"] = 4 * row["rows"] * row["tokens_per_row"] ** 2 * len({r for _, r in spec.rules})
        row["dense_bytes_computed"] = True
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_masks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="2048,8192,32768", help="tokens per row")
    parser.add_argument("--build-dense-up-to", type=int, default=32768,
                        help="longer rows count the dense bytes instead of building them (T^2 x 4 per rule)")
    parser.add_argument("--output", default="bench_results/masks.json", help="JSON results")
    args = parser.parse_args(argv)
    rows = []
    for length in [int(x) for x in args.lengths.split(",") if x]:
        for name, spec in SPECS.items():
            dense = length <= args.build_dense_up_to and (name == "one rule" or length <= 8192)
            rows.append({"layer_rules": name, **measure(length, spec, dense=dense)})
            r = rows[-1]
            counted = " (counted)" if r.get("dense_bytes_computed") else ""
            print(f"[bench_masks] T={r['tokens_per_row']:>6} {name:<20} dense {r['dense_bytes'] / 2**20:>10.1f} MiB"
                  f"{counted}   block {r['block_bytes'] / 2**20:>7.3f} MiB   ratio "
                  f"{r['dense_bytes'] / r['block_bytes']:>8.0f}x", flush=True)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"command": "python -m benchmarks.bench_masks " + " ".join(argv or sys.argv[1:]),
                                  "date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "rows": rows},
                                 indent=1))
    print(f"[bench_masks] results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
