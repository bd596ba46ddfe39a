"""Peak memory of training at a real vocabulary, against TRL's DPOTrainer on the same token ids (a benchmark).

    python -m benchmarks.bench_memory [--rows trl/full@1k,full@1k,...] [--steps 2] \
        [--output bench_results/bench_memory.json]

The workload: a Qwen2-shaped model built from a config (vocabulary 151,936, hidden 256, 4 layers, untied head),
random-token preference pairs at a fixed number of tokens per batch - 1k-token pairs (768-token prompt, two 256-token
answers) 4 per batch, or 4k-token pairs (3,072 + 2 x 1,024) 1 per batch. Each row runs in its own process (so its
peak is its own) for `--steps` optimizer steps (reference log-probs, policy forward + backward, AdamW), on the CPU
(peak RSS, VmHWM) or a GPU (`max_memory_allocated`). Rows are ours (the trainer's own pieces: load_policy,
build_reference, forward_and_loss) and TRL's (`DPOTrainer`, the same pairs as token ids, in the same order).

The breakdown per row: weights (bytes of every parameter of policy and reference as loaded; apart, those outside the
embeddings and the LM head, which are what bitsandbytes quantises), optimizer state
(AdamW's two fp32 moments per trainable parameter) and gradients (one per trainable parameter, in its dtype) are
counted; logits is the largest `[positions, vocab]` fp32 tensor the row's LM head path creates (counted from the
batch: every position for TRL, the scored answer positions for the dense head, one chunk for the chunked head);
activations and the rest is the measured peak minus the process's baseline and those. `dense` rows force the LM
head path this project used before `dpo/lm_head.py` (the model's own `[N, vocab]` logits), for a before/after;
`ckpt-head` rows force the chunked head's general form (each chunk through autograd under `checkpoint`) that
`dpo/lm_head.py` keeps for heads other than a plain `nn.Linear`; `glibc-heap` rows leave glibc's malloc as it is
(`dpo/host_memory.py` is what dpo.train does first); BENCH_MALLOC in the environment chooses another glibc setting
for every other row of ours (benchmarks/malloc_variants.py).

--vocab-size, --hidden-size, --layers and --pair-tokens shrink the workload (tests/test_bench_memory.py runs a tiny
one so this script cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = {"vocab_size": 151_936, "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 1024}
TOKENS_PER_PAIR = {"1k": (768, 256), "4k": (3072, 1024)}  # (prompt, each answer); 4k is 4 x 1k
PAIRS_PER_BATCH = {"1k": 4, "4k": 1}  # fixed tokens per batch: 4 x 1,280 vs 1 x 5,120
ROWS = {  # name: (engine, flags)
    "trl/full@1k": ("trl", {}),
    "full@1k": ("dpo", {}),
    "full/dense@1k": ("dpo", {"dense": True}),
    "full/ckpt-head@1k": ("dpo", {"checkpointed_head": True}),
    "full/glibc-heap@1k": ("dpo", {"glibc_heap": True}),
    "lora@1k": ("dpo", {"lora": True}),
    "lora/bf16@1k": ("dpo", {"lora": True, "torch_dtype": "bf16"}),
    "qlora/nf4@1k": ("dpo", {"lora": True, "torch_dtype": "bf16", "load_in_4bit": True}),
    "trl/full@4k": ("trl", {}),
    "full@4k": ("dpo", {}),
}
DEFAULT_ROWS = "trl/full@1k,full@1k,full/dense@1k,lora@1k,lora/bf16@1k,qlora/nf4@1k,full@4k"


def shape_of(args: argparse.Namespace) -> dict[str, int]:
    """The model shape: SHAPE with the command line's --vocab-size/--hidden-size/--layers."""
    return {**SHAPE, "vocab_size": args.vocab_size, "hidden_size": args.hidden_size,
            "num_hidden_layers": args.layers, "intermediate_size": 4 * args.hidden_size}


def tokens_per_pair(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(prompt, each answer) tokens of the 1k pairs (--pair-tokens) and of the 4k pairs (four times those)."""
    prompt, answer = args.pair_tokens
    return {"1k": (prompt, answer), "4k": (4 * prompt, 4 * answer)}


def build_workload(workdir: Path, *, shape: dict[str, int], lengths: dict[str, tuple[int, int]], steps: int,
                   seed: int) -> dict[str, Any]:
    """The model folder and the pairs of both lengths (kept when already built with the same settings)."""
    import random

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from demo.tiny import build_tokenizer

    key = {"shape": shape, "steps": steps, "seed": seed}
    if lengths != TOKENS_PER_PAIR:
        key["tokens_per_pair"] = {k: list(v) for k, v in lengths.items()}
    meta_path = workdir / "workload.json"
    if meta_path.is_file() and json.loads(meta_path.read_text())["key"] == key:
        return json.loads(meta_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**shape, tie_word_embeddings=False, max_position_embeddings=8192, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(workdir / "model")
    # A small tokenizer only for the pad/eos ids TRL's collator reads; the pairs are token ids of the full vocabulary.
    build_tokenizer(["a b c"] * 4, vocab_size=300).save_pretrained(workdir / "model")
    rng = random.Random(seed)
    pairs = {}
    for length, (prompt, answer) in lengths.items():
        count = PAIRS_PER_BATCH[length] * steps
        pairs[length] = [{name: [rng.randrange(3, shape["vocab_size"]) for _ in range(n)]
                          for name, n in (("prompt_ids", prompt), ("chosen_ids", answer), ("rejected_ids", answer))}
                         for _ in range(count)]
    (workdir / "pairs.json").write_text(json.dumps(pairs))
    meta = {"key": key, "parameters": sum(p.numel() for p in model.parameters())}
    meta_path.write_text(json.dumps(meta))
    return meta


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mb(device: str) -> float:
    from benchmarks.measure import peak_memory_mb

    return peak_memory_mb(device)


def useful_tokens(pairs: list[dict[str, list[int]]]) -> int:
    """prompt+chosen plus prompt+rejected: the tokens both trainers score, whatever the layout computes."""
    return sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def vocabulary_weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes of the input and output embeddings (distinct tensors): what bitsandbytes leaves unquantised."""
    seen: dict[int, torch.nn.Parameter] = {}
    for model in models:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            for p in module.parameters():
                seen[id(p)] = p
    return sum(p.numel() * p.element_size() for p in seen.values())


def parameter_bytes(*models: torch.nn.Module) -> tuple[int, int, int]:
    """(all weights, trainable weights, trainable parameter count) in bytes over distinct parameters."""
    seen: dict[int, torch.nn.Parameter] = {}
    for model in models:
        for p in model.parameters():
            seen[id(p)] = p
    total = sum(p.numel() * p.element_size() for p in seen.values())
    trainable = [p for p in seen.values() if p.requires_grad]
    return total, sum(p.numel() * p.element_size() for p in trainable), sum(p.numel() for p in trainable)


def run_dpo(name: str, flags: dict[str, Any], args: argparse.Namespace, device: str) -> dict[str, Any]:
    from accelerate import Accelerator

    from benchmarks.malloc_variants import apply_setting
    from dpo.config import TrainConfig
    from dpo.layouts import PACKED_SHARED, make_collate
    from dpo.masks import attention_spec
    from dpo.models import load_policy
    from dpo.reference import build_reference
    from dpo.train import build_optimizer, forward_and_loss

    length = name.rsplit("@", 1)[1]
    if flags.get("dense"):  # the path before dpo/lm_head.py: the model's own [N, V] logits
        import dpo.logprobs

        dpo.logprobs.chunked_head_logps = lambda *a, **k: None
    if flags.get("checkpointed_head"):  # the chunked head through autograd and `checkpoint`, for every head
        import dpo.lm_head

        dpo.lm_head._plain_linear_head = lambda *a, **k: False
    baseline = rss_mb()
    # glibc_heap: leave glibc's own mmap threshold, for a before/after; else what dpo.train does first
    # (return_freed_memory), unless $BENCH_MALLOC chooses another setting (benchmarks/malloc_variants.py)
    malloc_setting = "glibc_heap" if flags.get("glibc_heap") else apply_setting()
    cfg = TrainConfig(model_path=str(args.workdir / "model"), data_path=str(args.workdir),
                      lora=flags.get("lora", False), lora_dropout=0.0, torch_dtype=flags.get("torch_dtype", "auto"),
                      load_in_4bit=flags.get("load_in_4bit", False), batch_size=PAIRS_PER_BATCH[length],
                      logits_chunk_size=args.chunk_size, max_tokens_per_row=8192)
    accelerator = Accelerator(cpu=device == "cpu")
    policy = load_policy(cfg)
    optimizer = build_optimizer(policy, cfg)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    reference = build_reference("adapters_disabled" if cfg.lora else "model", cfg, accelerator, policy=policy,
                                unwrapped_policy=unwrapped)
    models = [unwrapped, *([reference.model] if reference.model is not None else [])]
    weights, trainable, _ = parameter_bytes(*models)
    vocabulary_weights = vocabulary_weight_bytes(*models)
    after_load = rss_mb()
    trainable_count = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    loaded = {"malloc_setting": malloc_setting, "weights_mb": weights / 2**20,
              "weights_outside_embeddings_mb": (weights - vocabulary_weights) / 2**20,
              "gradients_mb": trainable / 2**20, "optimizer_mb": 2 * 4 * trainable_count / 2**20,
              "baseline_mb": baseline, "after_load_mb": after_load}
    if args.steps == 0:  # weights as loaded only: what 16-bit and 4-bit loading save, at any model shape
        return {**loaded, "logits_mb": 0.0, "step_s": [], "useful_tokens_per_s": None}
    pairs = json.loads((args.workdir / "pairs.json").read_text())[length]
    # The layout the trainer's probe picks for this Qwen2-shaped model (tests/test_architectures.py).
    collate = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=cfg.max_tokens_per_row,
                           attention=attention_spec(unwrapped.config))
    times, scored = [], 0
    for step in range(args.steps):
        batch = collate(pairs[step * cfg.batch_size:(step + 1) * cfg.batch_size], None).to(accelerator.device)
        scored = int((batch.target_seq >= 0).sum())
        start = time.perf_counter()
        out = forward_and_loss(policy, reference, batch, cfg)
        accelerator.backward(out.loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    useful = useful_tokens(pairs[:cfg.batch_size])
    logits_rows = scored if flags.get("dense") else min(scored, args.chunk_size)  # the one [rows, V] fp32 tensor
    return {**loaded, "logits_mb": logits_rows * args.vocab_size * 4 / 2**20, "step_s": times,
            "useful_tokens_per_s": useful / min(times)}


def run_trl(name: str, args: argparse.Namespace, device: str) -> dict[str, Any]:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    length = name.rsplit("@", 1)[1]
    baseline = rss_mb()
    pairs = json.loads((args.workdir / "pairs.json").read_text())[length]
    batch_size = PAIRS_PER_BATCH[length]

    class SameIds(DPOTrainer):
        """The pairs are token ids already: skip TRL's text tokenization, keep its order."""

        def _prepare_dataset(self, dataset, *a: Any, **k: Any):
            return dataset

        def _get_train_sampler(self, *a: Any, **k: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(args.workdir / "model", dtype=torch.float32)

    policy, ref = load(), load()
    config = DPOConfig(output_dir=str(args.workdir / "trl_out"), per_device_train_batch_size=batch_size,
                       max_steps=args.steps, learning_rate=5e-6, lr_scheduler_type="constant", optim="adamw_torch",
                       max_length=None, gradient_checkpointing=False, use_cpu=device == "cpu", report_to=[],
                       save_strategy="no", logging_steps=1, dataloader_num_workers=0, disable_tqdm=True,
                       precompute_ref_log_probs=False)
    trainer = SameIds(model=policy, ref_model=ref, args=config, train_dataset=datasets.Dataset.from_list(pairs),
                      processing_class=AutoTokenizer.from_pretrained(args.workdir / "model"))
    weights, _, _ = parameter_bytes(policy, ref)
    _, trainable, count = parameter_bytes(policy)  # TRL leaves requires_grad on its reference: it does not train
    vocabulary_weights = vocabulary_weight_bytes(policy, ref)
    after_load = rss_mb()
    start = time.perf_counter()
    trainer.train()
    elapsed = (time.perf_counter() - start) / args.steps
    positions = 2 * batch_size * (len(pairs[0]["prompt_ids"]) + len(pairs[0]["chosen_ids"]))
    useful = useful_tokens(pairs[:batch_size])
    return {"weights_mb": weights / 2**20, "weights_outside_embeddings_mb": (weights - vocabulary_weights) / 2**20,
            "gradients_mb": trainable / 2**20, "optimizer_mb": 8 * count / 2**20,
            "logits_mb": positions * args.vocab_size * 4 / 2**20, "baseline_mb": baseline,
            "after_load_mb": after_load, "step_s": [elapsed], "useful_tokens_per_s": useful / elapsed}


def run_row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    engine, flags = ROWS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = run_trl(name, args, device) if engine == "trl" else run_dpo(name, flags, args, device)
    result["peak_mb"] = peak_mb(device)
    result["activations_and_rest_mb"] = None if args.steps == 0 else result["peak_mb"] - result["baseline_mb"] - sum(
        result[k] for k in ("weights_mb", "gradients_mb", "optimizer_mb", "logits_mb"))
    return result


def format_table(results: list[dict[str, Any]]) -> str:
    head = (f"{'row':<18} {'peak MB':>8} {'vs TRL':>7} {'weights':>8} {'w/o emb':>7} {'grads':>7} {'optim':>7} "
            f"{'logits':>7} {'activ+rest':>10} {'tok/s':>6}")
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<18} failed: {r['error'].strip().splitlines()[-1][:90]}")
            continue
        vs = f"{r['vs_trl']:.2f}x" if "vs_trl" in r else "-"
        rest = "-" if r["activations_and_rest_mb"] is None else f"{r['activations_and_rest_mb']:.0f}"
        speed = "-" if r["useful_tokens_per_s"] is None else f"{r['useful_tokens_per_s']:.0f}"
        lines.append(f"{r['name']:<18} {r['peak_mb']:>8.0f} {vs:>7} {r['weights_mb']:>8.0f} "
                     f"{r['weights_outside_embeddings_mb']:>7.1f} {r['gradients_mb']:>7.0f} {r['optimizer_mb']:>7.0f} "
                     f"{r['logits_mb']:>7.0f} {rest:>10} {speed:>6}")
    return "\n".join(lines)


def write_report(args: argparse.Namespace, meta: dict[str, Any], results: list[dict[str, Any]],
                 argv: list[str] | None) -> None:
    """Ratios to the TRL row of the same length, then the JSON report, written atomically."""
    from benchmarks.measure import hardware

    for r in results:
        trl = next((t for t in results if "error" not in t and t["name"].startswith("trl/")
                    and t["name"].endswith(r["name"].rsplit("@", 1)[1])), None)
        if trl is not None and "error" not in r and not r["name"].startswith("trl/"):
            r["vs_trl"] = r["peak_mb"] / trl["peak_mb"]
    report = {"command": "python -m benchmarks.bench_memory " + " ".join(sys.argv[1:] if argv is None else argv),
              "hardware": hardware(), "shape": shape_of(args), "parameters": meta["parameters"],
              "tokens_per_pair": tokens_per_pair(args), "pairs_per_batch": PAIRS_PER_BATCH, "rows": results}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.rename(args.output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per row (0: our rows load the "
                        "weights and stop - the weights memory of each loading mode, at any --hidden-size)")
    parser.add_argument("--chunk-size", type=int, default=None, help="logits_chunk_size of our rows (default: the "
                        "trainer's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=SHAPE["vocab_size"], help="vocabulary of the model")
    parser.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"], help="hidden size (MLP: 4x)")
    parser.add_argument("--layers", type=int, default=SHAPE["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--pair-tokens", type=lambda v: tuple(int(x) for x in v.split(",")),
                        default=TOKENS_PER_PAIR["1k"], help="PROMPT,ANSWER tokens of a 1k pair (4k pairs: 4x)")
    parser.add_argument("--workdir", type=Path, default=Path("bench_results/memory_workload"))
    parser.add_argument("--output", type=Path, default=Path("bench_results/bench_memory.json"))
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chunk_size is None:
        from dpo.config import TrainConfig

        args.chunk_size = TrainConfig().logits_chunk_size
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args._row is not None:  # a child process: one row, its result as the last stdout line
        import transformers

        transformers.logging.set_verbosity_error()
        print(json.dumps(run_row(args._row, args)))
        return 0
    names = [n for n in args.rows.split(",") if n]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        print(f"bench_memory: unknown rows {unknown}; choose from {', '.join(ROWS)}", file=sys.stderr)
        return 2
    if args.steps < 0 or (args.steps == 0 and any(ROWS[n][0] == "trl" for n in names)):
        print("bench_memory: --steps must be >= 1 (0, weights only, is for our rows, not TRL's)", file=sys.stderr)
        return 2
    meta = build_workload(args.workdir, shape=shape_of(args), lengths=tokens_per_pair(args), steps=args.steps,
                          seed=args.seed)
    print(f"[bench_memory] {meta['parameters'] / 1e6:.1f}M parameters, vocabulary {args.vocab_size:,}",
          flush=True)
    results: list[dict[str, Any]] = []
    for name in names:
        cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--_row", name, "--steps", str(args.steps),
               "--chunk-size", str(args.chunk_size), "--seed", str(args.seed), "--workdir", str(args.workdir),
               "--vocab-size", str(args.vocab_size), "--hidden-size", str(args.hidden_size),
               "--layers", str(args.layers), "--pair-tokens", ",".join(map(str, args.pair_tokens))]
        # The row runs from any directory: the repo root goes first on its PYTHONPATH (benchmarks/ is not installed).
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
        lines = proc.stdout.strip().splitlines()
        try:
            result = {"name": name, **json.loads(lines[-1])} if proc.returncode == 0 else None
        except (IndexError, json.JSONDecodeError):
            result = None
        results.append(result or {"name": name, "error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"})
        print(f"[bench_memory] {name}: " + (f"peak {result['peak_mb']:.0f} MB" if result else "failed"), flush=True)
        write_report(args, meta, results, argv)  # after every row: a long run interrupted keeps what it measured
    print(format_table(results))
    print(f"[bench_memory] results in {args.output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
