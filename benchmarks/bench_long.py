"""Long pairs on one GPU: the default layout with its attention kernel against the padded sdpa layout.

    python -m benchmarks.bench_long --output bench_results/long.json            (on a CUDA machine, ~6 minutes)
    python -m benchmarks.bench_long --shape tiny --lengths 256 --longest 512,1024 --steps 1   (a CPU smoke run)

A random-init model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, vocabulary 151,936,
tied embeddings; 494M parameters) trains in bf16 autocast over fp32 master weights with AdamW and a frozen
bf16 reference copy, exactly as `dpo.train` wires it (load_policy, build_reference, the layout probe,
forward_and_loss). Pairs are random token ids of fixed length L = prompt + answer (prompt 3/4 of L, answers
L/4 and a little shorter), so every step has one shape.

Rows: at each of `--lengths` (default 2k and 8k-token pairs; batch `--tokens-per-step` / L pairs) the default
(`--attn_implementation auto`: FlexAttention with block masks on CUDA, layout chosen by the probe) and the padded
sdpa layout, reporting useful tokens/s (prompt+chosen plus prompt+rejected), MFU (nominal 8 x N FLOPs per useful
token over the measured bf16 matmul rate; attention scores left out, as in bench_throughput) and peak GPU memory.
Then the longest pair each trains at batch 1 with gradient checkpointing (`--longest`, stopping at the first
out-of-memory). Results are written to the JSON after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import hardware, matmul_rates, peak_memory_mb, sync_device

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
}


def save_model(shape: str, folder: Path, max_positions: int) -> int:
    """The random-init model as a local folder (what dpo.train loads); returns its parameter count."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (folder / "config.json").is_file():
        config = Qwen2Config.from_pretrained(folder)
        if config.max_position_embeddings >= max_positions:
            with torch.device("meta"):
                return sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=max_positions, rope_theta=1e6, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def make_pairs(length: int, count: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    prompt, chosen = 3 * length // 4, length // 4
    rejected = chosen - chosen // 8

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(prompt), "chosen_ids": ids(chosen), "rejected_ids": ids(rejected)}
            for _ in range(count)]


def run_row(model_dir: Path, *, default: bool, length: int, batch: int, steps: int, warmup: int,
            checkpointing: bool, device: str, vocab: int) -> dict[str, Any]:
    """One configuration, trained as dpo.train wires it; returns its measurements (or the error)."""
    from accelerate import Accelerator

    from benchmarks.pieces import prepared_models, update
    from dpo.attention import resolve_for_run
    from dpo.config import TrainConfig
    from dpo.layouts import DataShape, choose_run_layout, make_collate
    from dpo.masks import mask_bytes
    from dpo.train import forward_and_loss

    cfg = TrainConfig(model_path=str(model_dir), data_path=str(model_dir), mixed_precision="bf16",
                      layout="auto" if default else "padded", prefix_sharing=None if default else False,
                      attn_implementation="auto" if default else "sdpa", max_tokens_per_row=max(2048, 2 * length),
                      batch_size=batch, gradient_checkpointing=checkpointing, reference="model")
    accelerator = Accelerator(mixed_precision="bf16", cpu=device == "cpu")
    cfg = resolve_for_run(cfg, device_type=accelerator.device.type, needs_backward=True)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    policy, optimizer, reference = prepared_models(cfg, accelerator)
    started = time.perf_counter()
    choice = choose_run_layout([policy, reference.model], cfg, accelerator, pad_token_id=0,
                               data=DataShape(longest=length, empty_prompts=False))
    probe_s = time.perf_counter() - started
    collate = make_collate(choice.layout, pad_token_id=0, max_tokens_per_row=cfg.max_tokens_per_row,
                           attention=choice.attention, mask_form=choice.mask_form)
    pairs = make_pairs(length, batch, vocab=vocab, seed=length)
    times, tokens, computed, masks = [], [], [], []
    for step in range(warmup + steps):
        sync_device(device)
        start = time.perf_counter()
        batch_k = collate(pairs, None).to(accelerator.device)
        out = forward_and_loss(policy, reference, batch_k, cfg)
        update(policy, optimizer, accelerator, out.loss, cfg)
        sync_device(device)
        if step >= warmup:
            times.append(time.perf_counter() - start)
            tokens.append(batch_k.num_tokens)
            computed.append(batch_k.input_ids.numel())
            masks.append(mask_bytes(batch_k.attention_mask))
    result = {"attn_implementation": cfg.attn_implementation, "layout": choice.layout.name,
              "layout_message": choice.message, "probe_s": probe_s, "step_times_s": times,
              "median_step_s": statistics.median(times), "useful_tokens_per_step": tokens[0],
              "computed_tokens_per_step": computed[0], "mask_bytes_per_batch": masks[0],
              "useful_tokens_per_s": statistics.median(n / t for n, t in zip(tokens, times)),
              "peak_memory_mb": peak_memory_mb(device), "loss": float(out.loss.detach())}
    del policy, optimizer, reference, out, batch_k
    return result


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="qwen2.5-0.5b", help="model shape")
    parser.add_argument("--lengths", default="2048,8192", help="pair lengths (prompt + answer) of the speed rows")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="batch = this / (2 x length) pairs")
    parser.add_argument("--longest", default="16384,32768,65536", help="pair lengths tried at batch 1")
    parser.add_argument("--rows", default="default,padded_sdpa", help="which of the two configurations to run")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per speed row")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (kernel compilation)")
    parser.add_argument("--workdir", default="bench_results/long", help="where the model folder is written")
    parser.add_argument("--output", default="bench_results/long.json", help="JSON results")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lengths = [int(x) for x in args.lengths.split(",") if x]
    longest = [int(x) for x in args.longest.split(",") if x]
    configurations = [name == "default" for name in ("default", "padded_sdpa") if name in args.rows.split(",")]
    model_dir = Path(args.workdir) / args.shape
    parameters = save_model(args.shape, model_dir, max_positions=2 * max(lengths + longest))
    rates = matmul_rates(device, 4096 if device == "cuda" else 512, repeats=5)
    report: dict[str, Any] = {"command": "python -m benchmarks.bench_long " + " ".join(argv or sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "matmul_gflops": rates,
                              "parameters": parameters, "shape": args.shape, "rows": []}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def record(name: str, result: dict[str, Any]) -> None:
        if "useful_tokens_per_s" in result:
            flops = 8 * parameters * result["useful_tokens_per_s"]  # policy fwd+bwd 6N, reference fwd 2N
            result["mfu"] = flops / (rates["bf16"] * 1e9)
        report["rows"].append({"name": name, **result})
        output.write_text(json.dumps(report, indent=1))
        summary = (result.get("error") or f"{result['median_step_s']:.2f} s/step, {result['useful_tokens_per_s']:.0f} "
                   f"useful tok/s, MFU {100 * result['mfu']:.1f}%, peak {result['peak_memory_mb']:.0f} MB, "
                   f"{result['layout']} / {result['attn_implementation']}")
        print(f"[bench_long] {name}: {summary}", flush=True)

    print(f"[bench_long] {parameters / 1e6:.0f}M parameters on {device}; bf16 matmul {rates['bf16'] / 1e3:.0f} "
          f"TFLOP/s", flush=True)
    for length in lengths:
        batch = max(1, args.tokens_per_step // (2 * length))
        for default in configurations:
            name = f"{'default' if default else 'padded_sdpa'}@{length}"
            try:
                record(name, run_row(model_dir, default=default, length=length, batch=batch, steps=args.steps,
                                     warmup=args.warmup, checkpointing=False, device=device,
                                     vocab=SHAPES[args.shape]["vocab_size"]) | {"batch": batch})
            except torch.cuda.OutOfMemoryError as exc:
                record(name, {"error": f"out of memory: {str(exc).splitlines()[0][:160]}", "batch": batch})
            free(device)
    for default in configurations:
        for length in longest:
            name = f"{'default' if default else 'padded_sdpa'}@{length}/batch1/checkpointing"
            try:
                record(name, run_row(model_dir, default=default, length=length, batch=1, steps=1, warmup=1,
                                     checkpointing=True, device=device,
                                     vocab=SHAPES[args.shape]["vocab_size"]) | {"batch": 1})
            except torch.cuda.OutOfMemoryError as exc:
                record(name, {"error": f"out of memory: {str(exc).splitlines()[0][:160]}", "batch": 1})
                free(device)
                break
            free(device)
    print(f"[bench_long] results in {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
