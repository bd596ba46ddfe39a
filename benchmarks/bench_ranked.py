"""Prompts with k = 4 scored answers: our k-branch layout against the same information as expanded pairs in TRL.

    python -m benchmarks.bench_ranked --vs-trl [--output bench_results/bench_ranked.json] [--steps 2] [--warmup 1]

The workload is bench_throughput's (a Llama-style model built from a config, a BPE tokenizer trained here, generated
multi-turn prompts with real length mixes), each prompt given k = 4 answers with distinct scores. Each step trains
on the same `--prompts-per-step` prompts in every row:

    trl/best_vs_rest        TRL 1.16's DPOTrainer on the expanded pairs (best, j) of each prompt: k - 1 = 3 pairs per
                            prompt, 3 x prompts-per-step pairs per step, sigmoid loss, a frozen reference copy
    pairs/prefix_shared     our pairwise trainer on the same expanded pairs (packed, prefix shared per pair)
    ranked/padded           --listwise_loss best_vs_rest, every prompt + answer its own padded row
    ranked/k_branch         --listwise_loss best_vs_rest, one prompt and its 4 answer branches per shared row,
                            packed (the layout a ranked run picks)

All four compute the same objective on the same prompts (best_vs_rest with sigmoid DPO is the mean of the pairs'
sigmoid losses). Useful tokens are what the information costs once: sum over answers of prompt + answer
(k x P + sum A per prompt), the same count in every row, so useful tokens/s compares the rows like for like (TRL
computes each prompt 2 x 3 = 6 times, the k-branch row once). Each row runs in a fresh process
(bench_throughput's row runner), median step time over the measured steps.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_throughput import (
    MODEL_SHAPE,
    TextGenerator,
    in_order_dpo_trainer,
    model_shape,
    row_in_fresh_process,
    summarize,
    trl_step_timer,
)
from benchmarks.measure import hardware, peak_memory_mb, sync_device
from demo.tiny import build_model, build_tokenizer

NUM_ANSWERS = 4
ROWS = ("trl/best_vs_rest", "pairs/prefix_shared", "ranked/padded", "ranked/k_branch")


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_workload(workdir: Path, *, seed: int, num_prompts: int, max_length: int, shape: dict[str, int]
                   ) -> dict[str, Any]:
    """Model, tokenizer and ranked records under `workdir`: prompts whose every answer starts exactly where the
    prompt's tokens end (so TRL's own tokenization of each pair gives the very same ids)."""
    workdir.mkdir(parents=True, exist_ok=True)
    gen = TextGenerator(seed, scale=max_length / 512)
    tokenizer = build_tokenizer(["".join(gen.conversation()) for _ in range(600)], vocab_size=shape["vocab_size"])
    rng = random.Random(seed)
    texts, records = [], []
    while len(records) < num_prompts:
        prompt = gen.conversation()[0]
        answers = [gen.paragraph(1, 6) + "</s>" for _ in range(NUM_ANSWERS)]
        prompt_ids = tokenizer(prompt).input_ids
        full = [tokenizer(prompt + a).input_ids for a in answers]
        if any(_prefix(prompt_ids, f) != len(prompt_ids) or len(f) > max_length for f in full):
            continue
        scores = [float(s) for s in rng.sample(range(1, 10), NUM_ANSWERS)]
        texts.append({"prompt": prompt, "answers": answers, "scores": scores})
        records.append({"prompt_ids": prompt_ids, "responses_ids": [f[len(prompt_ids):] for f in full],
                        "scores": scores})
    model = build_model(vocab_size=max(shape["vocab_size"], len(tokenizer)), hidden_size=shape["hidden_size"],
                        num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                        intermediate_size=shape["intermediate_size"], max_position_embeddings=max(2048, 2 * max_length),
                        tie_word_embeddings=True, seed=seed, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    (workdir / "records.json").write_text(json.dumps(records))
    (workdir / "texts.json").write_text(json.dumps(texts))
    prompt_tokens = [len(r["prompt_ids"]) for r in records]
    answer_tokens = [len(a) for r in records for a in r["responses_ids"]]
    meta = {"model_dir": str(workdir / "model"), "pad_token_id": tokenizer.pad_token_id,
            "parameters": sum(p.numel() for p in model.parameters()), "prompts": len(records),
            "answers_per_prompt": NUM_ANSWERS, "mean_prompt_tokens": statistics.mean(prompt_tokens),
            "mean_answer_tokens": statistics.mean(answer_tokens)}
    (workdir / "workload.json").write_text(json.dumps(meta, indent=1))
    return meta


def expanded_pairs(record: dict[str, Any]) -> list[dict[str, Any]]:
    """best_vs_rest as pairs: (best, j) for every other answer j, in input order."""
    best = max(range(NUM_ANSWERS), key=lambda i: record["scores"][i])
    return [{"prompt_ids": record["prompt_ids"], "chosen_ids": record["responses_ids"][best],
             "rejected_ids": record["responses_ids"][j]} for j in range(NUM_ANSWERS) if j != best]


def useful_tokens(records: list[dict[str, Any]]) -> int:
    return sum(len(r["prompt_ids"]) * len(r["responses_ids"]) + sum(map(len, r["responses_ids"])) for r in records)


def step_records(records: list[dict[str, Any]], args: argparse.Namespace) -> list[list[dict[str, Any]]]:
    per = args.prompts_per_step
    return [[records[(k * per + i) % len(records)] for i in range(per)] for k in range(args.warmup + args.steps)]


def run_ours(name: str, meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Our trainer's pieces as dpo.train wires them (bench_throughput.run_dpo_row's way)."""
    from accelerate import Accelerator

    from benchmarks.pieces import prepared_models, update
    from dpo.config import TrainConfig
    from dpo.layouts import PACKED_SHARED, PADDED, make_collate
    from dpo.ranked_batch import make_ranked_collate
    from dpo.train import forward_and_loss

    ranked = name.startswith("ranked/")
    cfg = TrainConfig(model_path=meta["model_dir"], data_path=str(args.workdir), batch_size=args.prompts_per_step,
                      listwise_loss="best_vs_rest" if ranked else None, max_tokens_per_row=args.max_tokens_per_row,
                      seed=args.seed)
    torch.manual_seed(args.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = str(accelerator.device)
    layout = PADDED if name == "ranked/padded" else PACKED_SHARED
    if ranked:
        collate = make_ranked_collate(layout, num_answers=NUM_ANSWERS, pad_token_id=meta["pad_token_id"],
                                      max_tokens_per_row=cfg.max_tokens_per_row)
    else:
        collate = make_collate(layout, pad_token_id=meta["pad_token_id"], max_tokens_per_row=cfg.max_tokens_per_row)
    policy, optimizer, reference = prepared_models(cfg, accelerator)
    records = json.loads((Path(args.workdir) / "records.json").read_text())
    times, cpu, tokens, computed = [], [], [], []
    for k, group in enumerate(step_records(records, args)):
        items = group if ranked else [p for r in group for p in expanded_pairs(r)]
        sync_device(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = collate(items, None).to(device)
        out = forward_and_loss(policy, reference, batch, cfg)
        update(policy, optimizer, accelerator, out.loss, cfg)
        sync_device(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            tokens.append(useful_tokens(group))
            computed.append(batch.input_ids.numel())
    result = summarize(times, tokens, batch_size=args.prompts_per_step, step_cpu=cpu if device == "cpu" else None)
    result.update(computed_tokens_per_step=statistics.mean(computed), peak_memory_mb=peak_memory_mb(device))
    return result


def run_trl(meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """TRL's DPOTrainer on the expanded pairs, same model, in order, checkpointing off (bench_throughput's way)."""
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    records = json.loads((Path(args.workdir) / "records.json").read_text())
    texts = json.loads((Path(args.workdir) / "texts.json").read_text())
    index = {id(r): i for i, r in enumerate(records)}
    groups = step_records(records, args)
    rows, pairs = [], []
    for group in groups:
        for record in group:
            t = texts[index[id(record)]]
            best = max(range(NUM_ANSWERS), key=lambda i: t["scores"][i])
            rows += [{"prompt": t["prompt"], "chosen": t["answers"][best], "rejected": t["answers"][j]}
                     for j in range(NUM_ANSWERS) if j != best]
            pairs += expanded_pairs(record)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    per_step = (NUM_ANSWERS - 1) * args.prompts_per_step
    config = DPOConfig(output_dir=str(Path(args.workdir) / "trl_out"), per_device_train_batch_size=per_step,
                       max_steps=len(groups), learning_rate=5e-6, lr_scheduler_type="constant", weight_decay=0.0,
                       max_grad_norm=1.0, optim="adamw_torch", beta=0.1, max_length=args.max_length,
                       gradient_checkpointing=False, use_cpu=device == "cpu", report_to=[], save_strategy="no",
                       logging_steps=1, dataloader_num_workers=0, seed=args.seed, precompute_ref_log_probs=False,
                       disable_tqdm=True)

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(meta["model_dir"], dtype=torch.float32)

    timer = trl_step_timer(device)
    tokenizer = AutoTokenizer.from_pretrained(meta["model_dir"])
    trainer = in_order_dpo_trainer()(model=load(), ref_model=load(), args=config,
                                     train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                                     callbacks=[timer])
    same = all(trainer.train_dataset[j][key] == pairs[j][key] for j in range(len(pairs))
               for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
    if not same:
        raise RuntimeError("TRL tokenized the workload differently: the comparison would not be like for like")
    trainer.train()
    tokens = [useful_tokens(group) for group in groups][args.warmup:]
    result = summarize(timer.times[args.warmup:], tokens, batch_size=args.prompts_per_step,
                       step_cpu=timer.cpu[args.warmup:] if device == "cpu" else None)
    # What TRL computes: each batch's chosen and rejected sequences padded to its longest prompt + answer.
    width = [2 * per_step * max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
                                for p in pairs[k * per_step:(k + 1) * per_step]) for k in range(len(groups))]
    result.update(peak_memory_mb=peak_memory_mb(device), same_token_ids_as_dpo=same, trl_version=trl.__version__,
                  computed_tokens_per_step=statistics.mean(width[args.warmup:]))
    return result


def run_row_in_subprocess(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return row_in_fresh_process("benchmarks.bench_ranked", name, name, args)


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'row':<22} {'step s':>7} {'useful tok/s':>12} {'prompts/s':>9} {'peak MB':>8} {'vs TRL':>7} "
            f"{'tok/CPU-s':>9} {'CPU vs TRL':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<22} failed: {r['error'].splitlines()[-1][:80]}")
            continue
        vs = f"{r['speedup_vs_trl']:.2f}x" if r.get("speedup_vs_trl") else "-"
        cpu_vs = f"{r['cpu_speedup_vs_trl']:.2f}x" if r.get("cpu_speedup_vs_trl") else "-"
        per_cpu = f"{r['useful_tokens_per_cpu_s']:.0f}" if "useful_tokens_per_cpu_s" in r else "-"
        lines.append(f"{r['name']:<22} {r['median_step_s']:>7.2f} {r['useful_tokens_per_s']:>12.0f} "
                     f"{r['pairs_per_s']:>9.2f} {r['peak_memory_mb']:>8.0f} {vs:>7} {per_cpu:>9} {cpu_vs:>10}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_ranked", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vs-trl", action="store_true", help="also run TRL's DPOTrainer on the expanded pairs")
    parser.add_argument("--output", default="bench_results/bench_ranked.json", help="JSON results file")
    parser.add_argument("--steps", type=int, default=2, help="measured optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    parser.add_argument("--prompts-per-step", type=int, default=4, help="prompts (each with 4 answers) per step")
    parser.add_argument("--max-length", type=int, default=512, help="bound on prompt + answer tokens")
    parser.add_argument("--max-tokens-per-row", type=int, default=2048, help="packed rows: bound on a row's tokens")
    parser.add_argument("--seed", type=int, default=0, help="fixes the text, tokenizer, model and records")
    parser.add_argument("--hidden-size", type=int, default=MODEL_SHAPE["hidden_size"], help="model width")
    parser.add_argument("--num-layers", type=int, default=MODEL_SHAPE["num_layers"], help="decoder layers")
    parser.add_argument("--vocab-size", type=int, default=MODEL_SHAPE["vocab_size"], help="BPE vocabulary")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all)")
    parser.add_argument("--workdir", default="bench_results/workload_ranked", help="where the workload is built")
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_row_output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--max-length={args.max_length}",
                        f"--prompts-per-step={args.prompts_per_step}", f"--seed={args.seed}",
                        f"--max-tokens-per-row={args.max_tokens_per_row}", f"--workdir={args.workdir}",
                        f"--threads={args.threads}"]
    args.shape = model_shape(hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    if args._row is not None:  # a child process: one row
        meta = json.loads((workdir / "workload.json").read_text())
        result = run_trl(meta, args) if args._row.startswith("trl/") else run_ours(args._row, meta, args)
        Path(args._row_output).write_text(json.dumps(result))
        return 0
    started = time.time()
    meta = build_workload(workdir, seed=args.seed, num_prompts=args.prompts_per_step * (args.warmup + args.steps),
                          max_length=args.max_length, shape=args.shape)
    print(f"[bench_ranked] {meta['parameters'] / 1e6:.1f}M parameters, {meta['prompts']} prompts x {NUM_ANSWERS} "
          f"answers (mean prompt {meta['mean_prompt_tokens']:.0f} tokens, mean answer "
          f"{meta['mean_answer_tokens']:.0f}), {args.prompts_per_step} prompts per step", flush=True)
    names = [n for n in ROWS if (args.vs_trl or not n.startswith("trl/")) and (not args.rows or n in args.rows)]
    results = []
    for name in names:
        print(f"[bench_ranked] {name} ...", flush=True)
        results.append({"name": name, **run_row_in_subprocess(name, args)})
    trl_row = next((r for r in results if r["name"].startswith("trl/") and "error" not in r), None)
    for r in results:
        if trl_row is not None and r is not trl_row and "error" not in r:
            r["speedup_vs_trl"] = r["useful_tokens_per_s"] / trl_row["useful_tokens_per_s"]
            if "useful_tokens_per_cpu_s" in r and "useful_tokens_per_cpu_s" in trl_row:
                r["cpu_speedup_vs_trl"] = r["useful_tokens_per_cpu_s"] / trl_row["useful_tokens_per_cpu_s"]
    report = {"command": "python -m benchmarks.bench_ranked " + " ".join(sys.argv[1:] if argv is None else argv),
              "hardware": hardware(), "threads": torch.get_num_threads(),
              "workload": {k: v for k, v in meta.items() if k != "model_dir"} | {
                  "prompts_per_step": args.prompts_per_step, "warmup_steps": args.warmup,
                  "measured_steps": args.steps, **args.shape},
              "rows": results, "wall_s": time.time() - started}
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(format_table(results))
    print(f"[bench_ranked] results in {output} ({report['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
