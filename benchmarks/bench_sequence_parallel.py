"""Per-rank peak memory of one long pair's policy forward + backward, whole (N = 1) and split across N processes.

    python -m benchmarks.bench_sequence_parallel --tokens 8192 --json bench_results/sequence_parallel.json
    python -m benchmarks.bench_sequence_parallel --tokens 1024 --sizes 1,2        (a quick CPU check)

One prompt-shared pair (prompt 3/4 of the tokens, two answers of 1/8 each: one row of `--tokens` tokens, the
project's default layout with its dense [T x T] mask) through a random-init Llama-shaped model, fp32, on gloo
processes started here (torch.multiprocessing), exactly the code a run uses: the collate, `dpo.sequence_parallel`
(shard, install) and `dpo.logprobs.sequence_logps` with the chunked LM head, then backward.

Each rank reports its resident memory before the forward (weights, the batch and its full mask: the "static" part,
which splitting does not shrink) and the peak during forward + backward (the high-water mark is reset just before,
through /proc/self/clear_refs); their difference is the activation part, which should fall to about 1/N. On CUDA
one would read torch.cuda.max_memory_allocated instead; this script measures the CPU (peak RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

SHAPE = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             intermediate_size=1024, vocab_size=4096, head_dim=32)


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pair(tokens: int, vocab: int) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(0)
    answer = tokens // 8
    prompt = tokens - 2 * answer

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return {"prompt_ids": ids(prompt), "chosen_ids": ids(answer), "rejected_ids": ids(answer)}


def _worker(rank: int, size: int, port: int, tokens: int, layers: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo import sequence_parallel as sp
    from dpo.host_memory import return_freed_memory
    from dpo.layouts import PACKED_SHARED, make_collate
    from dpo.logprobs import sequence_logps
    from dpo.masks import attention_spec

    return_freed_memory()  # as dpo.train does: freed tensors leave the RSS, so the peak follows live tensors
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(0)
    config = LlamaConfig(**{**SHAPE, "num_hidden_layers": layers}, max_position_embeddings=tokens + 64,
                         attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    spec = attention_spec(config)
    batch = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=tokens + 64, attention=spec)(
        [_pair(tokens, SHAPE["vocab_size"])], None)
    width = int(batch.input_ids.shape[1])
    group = sp.setup(size) if size > 1 else None
    if group is not None:
        sp.install(group, "sdpa")
        batch = sp.shard(batch, group, spec)
    torch.distributed.barrier()
    static = _rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from the current RSS
    started = time.perf_counter()
    out = sequence_logps(model, batch, chunk_size=256)
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    seconds = time.perf_counter() - started
    peak = _rss_mb("VmHWM")
    result = {"size": size, "rank": rank, "row_tokens": width, "local_tokens": int(batch.input_ids.shape[1]),
              "static_mb": static, "peak_mb": peak, "activation_mb": peak - static, "seconds": seconds,
              "chosen_logps": float(out.chosen_logps[0].detach()),
              "rejected_logps": float(out.rejected_logps[0].detach())}
    (Path(out_dir) / f"size{size}_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(tokens: int, sizes: list[int], layers: int) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            mp.spawn(_worker, args=(size, _free_port(), tokens, layers, tmp), nprocs=size, join=True)
            ranks = [json.loads((Path(tmp) / f"size{size}_rank{r}.json").read_text()) for r in range(size)]
            worst = max(ranks, key=lambda r: r["peak_mb"])
            rows.append({**worst, "ranks": ranks})
    base = rows[0]["activation_mb"]
    for row in rows:
        row["activation_vs_n1"] = row["activation_mb"] / base
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of the pair's one prompt-shared row")
    parser.add_argument("--sizes", default="1,2", help="sequence-parallel sizes to measure, comma-separated")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"],
                        help="decoder layers (activations grow with them; the full mask and fixed costs do not)")
    parser.add_argument("--json", default="", help="write the rows here too")
    args = parser.parse_args(argv)
    rows = measure(args.tokens, [int(s) for s in args.sizes.split(",")], args.layers)
    shape = {**SHAPE, "num_hidden_layers": args.layers}
    print(f"one pair, {rows[0]['row_tokens']} tokens in one prompt-shared row; model {shape}; fp32, CPU, "
          f"per-rank peak RSS (the worst rank)")
    print("| N | tokens per rank | static MB (weights, batch, full mask) | peak MB | activations MB | vs N=1 | "
          "fwd+bwd s | chosen logp |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['local_tokens']} | {r['static_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['activation_mb']:.0f} | {r['activation_vs_n1']:.2f} | {r['seconds']:.1f} | "
              f"{r['chosen_logps']:.4f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "shape": shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
