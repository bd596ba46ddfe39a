"""Training-throughput benchmark: batch layouts and reference strategies on a fixed workload, optionally against TRL.

    ./launch.sh bench --vs-trl
    python -m benchmarks.bench_throughput [--vs-trl] [--output bench_results/bench.json] [--steps 3] [--warmup 1] \
        [--full-grid]                                               (from the repo root; what ./launch.sh bench runs)

The workload is fixed by `--seed`: a Llama-style model built from a config (hidden 512, 8 layers, vocabulary 8k, tied
embeddings, about 28M parameters), a byte-level BPE tokenizer of 8k tokens trained here on generated text, and
preference pairs generated here with a realistic length mix (multi-turn prompts of a few hundred tokens, shorter
answers), every prompt + answer within `--max-length`. Every row runs in a fresh process (so its peak memory is its
own) and trains on the same batches in the same order: `--warmup` steps, then `--steps` measured steps of a full
optimizer step (collate, reference log-probs, policy forward and backward, clipping, AdamW).

Reported per row: median step time, useful tokens/s (prompt+chosen plus prompt+rejected tokens, whatever the
layout computes), pairs/s, peak memory (process peak RSS on CPU, peak allocated on CUDA) and model-FLOP
utilisation: nominal FLOPs of the workload ((6 full or 4 LoRA) x N per useful token for the policy, + 2 x N when a
reference forward runs; N = all parameters, the tied embedding counted once as the LM head; attention scores left
out) over the step time and the matmul rate measured in the same run (2048 x 2048, fp32 or bf16); in the JSON also
the trainable and the reference model's parameter counts. benchmarks/bench_reference.py measures its strategies as
rows of this benchmark (`run_row_in_subprocess`) on a workload of its own. Our rows set glibc's malloc as dpo.train
does (dpo/host_memory.py), or as BENCH_MALLOC in the environment says (benchmarks/malloc_variants.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.measure import hardware, matmul_rates, peak_memory_mb, sync_device
from demo.tiny import build_model, build_tokenizer
from dpo.data import collate_padded
from dpo.logprobs import sequence_logps

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = "bench_results/bench.json"
MODEL_SHAPE = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 1280, "vocab_size": 8192}


@dataclass(frozen=True)
class Row:
    """One benchmark configuration."""

    name: str
    engine: str = "dpo"  # dpo | trl
    layout: str = "padded"  # padded | packed
    prefix_sharing: bool = False
    reference: str = "model"  # model | adapters_disabled | precomputed
    precision: str = "fp32"  # fp32 | bf16 (CPU/CUDA autocast)
    max_tokens_per_row: int = 0  # 0: --max-tokens-per-row
    lora: bool = False  # a LoRA policy under any reference (adapters_disabled is LoRA whatever this says)

    @property
    def trains_lora(self) -> bool:
        return self.lora or self.reference == "adapters_disabled"


def model_shape(*, hidden_size: int, num_layers: int, vocab_size: int) -> dict[str, int]:
    """MODEL_SHAPE at another width, depth or vocabulary: 64-wide heads, the same MLP ratio."""
    ratio = MODEL_SHAPE["intermediate_size"] / MODEL_SHAPE["hidden_size"]
    return {"hidden_size": hidden_size, "num_layers": num_layers, "vocab_size": vocab_size,
            "num_heads": max(1, hidden_size // 64), "intermediate_size": round(hidden_size * ratio)}


def plan_rows(*, full_grid: bool, vs_trl: bool, bf16: bool, row_bounds: list[int]) -> list[Row]:
    """TRL, then layouts under the frozen-copy reference, then the other strategies under the fastest layout (or
    the whole grid), then bf16 autocast of the fastest exact configuration."""
    layouts = [("padded", "padded", False), ("packed", "packed", False), ("prefix_shared", "packed", True)]
    references = ["model", "adapters_disabled", "precomputed"]
    rows = [Row(name="trl/model", engine="trl")] if vs_trl else []  # first: the baseline every ratio divides by
    for reference in references:
        for label, layout, shared in layouts:
            if full_grid or reference == "model" or label == "prefix_shared":
                rows.append(Row(name=f"{label}/{reference}", layout=layout, prefix_sharing=shared,
                                reference=reference))
    if full_grid:
        rows.append(Row(name="prefix_shared_unpacked/model", layout="padded", prefix_sharing=True))
    for bound in row_bounds:  # the row-length trade-off: less padding against a quadratic dense mask
        rows.append(Row(name=f"prefix_shared@{bound}/model", layout="packed", prefix_sharing=True,
                        max_tokens_per_row=bound))
    if bf16:
        rows.append(Row(name="prefix_shared/model/bf16", layout="packed", prefix_sharing=True, precision="bf16"))
    return rows


# ---------------------------------------------------------------------------------------------- the workload


def _lexicon(rng: random.Random, size: int) -> list[str]:
    syllables = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"] + ["an", "er", "in", "on", "ul", "ith", "ess"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3, 3, 4)))))
    return sorted(words)


class TextGenerator:
    """Seeded pseudo-English: Zipf-distributed words from a fixed lexicon, sentences, multi-turn conversations.

    `scale` (max_length / 512, at most 1) shrinks everything for small smoke-test workloads."""

    def __init__(self, seed: int, *, scale: float = 1.0) -> None:
        self.rng = random.Random(seed)
        self.words = _lexicon(random.Random(seed + 1), 3000)
        self.weights = [1.0 / (rank + 2.7) for rank in range(len(self.words))]
        self.scale = min(1.0, scale)

    def _count(self, low: int, high: int) -> int:
        return self.rng.randint(low, max(low, round(high * self.scale)))

    def sentence(self) -> str:
        n = self._count(5, 18)
        words = self.rng.choices(self.words, weights=self.weights, k=n)
        if self.rng.random() < 0.2:
            words.insert(self.rng.randrange(n), str(self.rng.randint(0, 2025)))
        if self.rng.random() < 0.3:
            words[self.rng.randrange(1, len(words))] += ","
        return " ".join(words).capitalize() + self.rng.choice((".", ".", ".", "?", "!"))

    def paragraph(self, low: int, high: int) -> str:
        return " ".join(self.sentence() for _ in range(self._count(low, high)))

    def conversation(self) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) in demo.tiny's chat format; the prompt ends where the answer begins."""
        turns = [f"<|system|>\n{self.paragraph(1, 3)}</s>\n"]
        for _ in range(self._count(1, 4) if self.scale > 0.5 else 0):
            turns.append(f"<|user|>\n{self.paragraph(2, 6)}</s>\n")
            turns.append(f"<|assistant|>\n{self.paragraph(2, 6)}</s>\n")
        turns.append(f"<|user|>\n{self.paragraph(1, 4)}</s>\n<|assistant|>\n")
        return "".join(turns), self.paragraph(1, 6) + "</s>", self.paragraph(1, 6) + "</s>"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def tokenize_pair(tokenizer: Any, prompt: str, chosen: str, rejected: str) -> dict[str, list[int]]:
    """The split TRL's DPOTrainer makes (the answer starts where prompt and prompt+answer tokens diverge), so both
    trainers see the very same token ids."""
    prompt_ids = tokenizer(prompt).input_ids
    with_chosen = tokenizer(prompt + chosen).input_ids
    with_rejected = tokenizer(prompt + rejected).input_ids
    cut = min(_common_prefix(prompt_ids, with_chosen), _common_prefix(prompt_ids, with_rejected))
    return {"prompt_ids": prompt_ids[:cut], "chosen_ids": with_chosen[cut:], "rejected_ids": with_rejected[cut:]}


def build_workload(workdir: Path, *, seed: int, num_pairs: int, max_length: int, shape: dict[str, int]
                   ) -> dict[str, Any]:
    """Tokenizer, model and pairs under `workdir` (reused when already built for the same settings)."""
    key = {"seed": seed, "num_pairs": num_pairs, "max_length": max_length, **shape}
    meta_path = workdir / "workload.json"
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("key") == key:
        return json.loads(meta_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    gen = TextGenerator(seed, scale=max_length / 512)
    corpus = ["".join(gen.conversation()) for _ in range(600)]
    tokenizer = build_tokenizer(corpus, vocab_size=shape["vocab_size"])
    records, pairs = [], []
    while len(pairs) < num_pairs:
        prompt, chosen, rejected = gen.conversation()
        ids = tokenize_pair(tokenizer, prompt, chosen, rejected)
        if len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])) <= max_length:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            pairs.append(ids)
    model = build_model(vocab_size=max(shape["vocab_size"], len(tokenizer)), hidden_size=shape["hidden_size"],
                        num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                        intermediate_size=shape["intermediate_size"],
                        max_position_embeddings=max(2048, 2 * max_length), tie_word_embeddings=True, seed=seed,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(workdir / "model")
    tokenizer.save_pretrained(workdir / "model")
    # Precomputed reference columns: the frozen reference is the starting model, in fp32, padded layout.
    with torch.no_grad():
        for start in range(0, len(pairs), 8):
            chunk = pairs[start:start + 8]
            out = sequence_logps(model, collate_padded(chunk, pad_token_id=tokenizer.pad_token_id))
            for pair, c, r in zip(chunk, out.chosen_logps.tolist(), out.rejected_logps.tolist()):
                pair.update(ref_chosen_logps=c, ref_rejected_logps=r)
    (workdir / "pairs.json").write_text(json.dumps(pairs))
    (workdir / "records.json").write_text(json.dumps(records))
    prompt_tokens = sum(len(p["prompt_ids"]) for p in pairs)
    answer_tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)
    meta = {
        "key": key, "model_dir": str(workdir / "model"), "pad_token_id": tokenizer.pad_token_id,
        "tokenizer_vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
        "pairs": len(pairs), "mean_prompt_tokens": prompt_tokens / len(pairs),
        "mean_answer_tokens": answer_tokens / (2 * len(pairs)),
        "max_prompt_tokens": max(len(p["prompt_ids"]) for p in pairs),
        "prompt_share_of_useful_tokens": 2 * prompt_tokens / (2 * prompt_tokens + answer_tokens),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def batches_of(pairs: list[dict[str, Any]], *, batch_size: int, count: int) -> list[list[dict[str, Any]]]:
    return [[pairs[(k * batch_size + i) % len(pairs)] for i in range(batch_size)] for k in range(count)]


# --------------------------------------------------------------------------------------------- measurements


def summarize(step_times: list[float], step_tokens: list[int], *, batch_size: int,
              step_cpu: list[float] | None = None) -> dict[str, Any]:
    """Medians over the measured steps. `step_cpu` (process CPU seconds, all threads) gives useful tokens per
    CPU-second too: on a machine shared with other jobs wall time stretches with the load, CPU time much less."""
    rates = [n / t for n, t in zip(step_tokens, step_times)]
    median = statistics.median(step_times)
    out: dict[str, Any] = {"median_step_s": median, "useful_tokens_per_s": statistics.median(rates),
                           "pairs_per_s": batch_size / median, "step_times_s": step_times}
    if step_cpu:
        out["step_cpu_s"] = step_cpu
        out["useful_tokens_per_cpu_s"] = statistics.median([n / t for n, t in zip(step_tokens, step_cpu)])
    return out


# ------------------------------------------------------------------------------------------------- our rows


def run_dpo_row(row: Row, meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The trainer's own pieces, as dpo.train wires them: load_policy, build_reference, forward_and_loss."""
    # Imported here, in the row's own process: the parent never trains, and with --device cpu it must hide the GPU
    # (CUDA_VISIBLE_DEVICES) before anything that may initialise CUDA is imported.
    from accelerate import Accelerator

    from benchmarks.malloc_variants import apply_setting
    from benchmarks.pieces import update
    from dpo.config import TrainConfig
    from dpo.layouts import make_collate
    from dpo.models import load_policy
    from dpo.reference import build_reference
    from dpo.train import build_optimizer, forward_and_loss

    cfg = TrainConfig(model_path=meta["model_dir"], data_path=str(args.workdir), lora=row.trains_lora,
                      lora_dropout=0.0, reference=row.reference, layout=row.layout, prefix_sharing=row.prefix_sharing,
                      max_tokens_per_row=row.max_tokens_per_row or args.max_tokens_per_row, batch_size=args.batch_size,
                      mixed_precision="bf16" if row.precision == "bf16" else "no", seed=args.seed)
    malloc_setting = apply_setting()  # what dpo.train does first (return_freed_memory), unless $BENCH_MALLOC
    torch.manual_seed(args.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    device = str(accelerator.device)
    pairs = json.loads((Path(args.workdir) / "pairs.json").read_text())
    if row.reference != "precomputed":
        pairs = [{k: v for k, v in p.items() if not k.startswith("ref_")} for p in pairs]
    collate = make_collate(cfg.layout, pad_token_id=meta["pad_token_id"], max_tokens_per_row=cfg.max_tokens_per_row,
                           prefix_sharing=cfg.prefix_sharing)
    policy = load_policy(cfg)
    policy.train()
    batches = batches_of(pairs, batch_size=args.batch_size, count=args.warmup + args.steps)
    result: dict[str, Any] = {"matmul_gflops": matmul_rates(device, args.matmul_size, repeats=3)}
    if row.precision == "bf16":  # fp32 log-probs of the first batch before prepare() wraps forward in autocast
        first = collate(batches[0], None).to(device)
        with torch.no_grad():
            exact = sequence_logps(policy.to(device), first)
    optimizer = build_optimizer(policy, cfg)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    unwrapped = accelerator.unwrap_model(policy)
    reference = build_reference(row.reference, cfg, accelerator, policy=policy, unwrapped_policy=unwrapped)
    if row.precision == "bf16":  # the price of autocast: per-sequence log-prob error against fp32
        with torch.no_grad():
            approx = sequence_logps(policy, first)
        errors = torch.cat([approx.chosen_logps - exact.chosen_logps, approx.rejected_logps - exact.rejected_logps])
        lengths = torch.cat([exact.chosen_lengths, exact.rejected_lengths])
        sums = torch.cat([exact.chosen_logps, exact.rejected_logps]).abs()
        result["bf16_logp_error"] = {
            "max_abs_sequence_sum": float(errors.abs().max()),
            "mean_abs_sequence_sum": float(errors.abs().mean()),
            "max_abs_per_token": float((errors.abs() / lengths).max()),
            "max_rel_sequence_sum": float((errors.abs() / sums).max()),
        }
    step_times, step_cpu, step_tokens, computed = [], [], [], []
    for k, pairs_k in enumerate(batches):
        sync_device(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        batch = collate(pairs_k, None).to(device)
        out = forward_and_loss(policy, reference, batch, cfg)
        update(policy, optimizer, accelerator, out.loss, cfg)
        sync_device(device)
        if k >= args.warmup:
            step_times.append(time.perf_counter() - start)
            step_cpu.append(time.process_time() - start_cpu)
            step_tokens.append(batch.num_tokens)
            computed.append(batch.input_ids.numel())
    result.update(summarize(step_times, step_tokens, batch_size=args.batch_size,
                            step_cpu=step_cpu if device == "cpu" else None))
    result["computed_tokens_per_step"] = statistics.mean(computed)
    result["useful_tokens_per_step"] = statistics.mean(step_tokens)
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["device"] = device
    result["malloc_setting"] = malloc_setting
    result["trainable_params"] = sum(p.numel() for p in unwrapped.parameters() if p.requires_grad)
    frozen_copy = reference.model
    result["reference_params"] = sum(p.numel() for p in frozen_copy.parameters()) if frozen_copy is not None else 0
    return result


# ------------------------------------------------------------------------------------------------------ TRL


def trl_step_timer(device: str) -> Any:
    """A TrainerCallback recording each TRL step's wall-clock and CPU seconds (`times`, `cpu`), device synced."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            sync_device(device)
            self.start, self.start_cpu = time.perf_counter(), time.process_time()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            sync_device(device)
            self.times.append(time.perf_counter() - self.start)
            self.cpu.append(time.process_time() - self.start_cpu)

    return StepTimer()


def in_order_dpo_trainer() -> type:
    """TRL's DPOTrainer reading its dataset in order: the same batches, in the same order, as our rows."""
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *a: Any, **k: Any) -> SequentialSampler:
            return SequentialSampler(self.train_dataset)

    return InOrder


def run_trl_row(row: Row, meta: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """TRL's DPOTrainer on the same model, tokens, batches (in order) and precision; checkpointing off."""
    # Imported here for the reason given in run_dpo_row; trl is an optional dependency besides.
    import datasets
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    records = json.loads((Path(args.workdir) / "records.json").read_text())
    pairs = json.loads((Path(args.workdir) / "pairs.json").read_text())
    count = args.warmup + args.steps
    order = [(k * args.batch_size + i) % len(records) for k in range(count) for i in range(args.batch_size)]
    dataset = datasets.Dataset.from_list([records[i] for i in order])
    tokenizer = AutoTokenizer.from_pretrained(meta["model_dir"])

    def load() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(meta["model_dir"], dtype=torch.float32)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = DPOConfig(
        output_dir=str(Path(args.workdir) / "trl_out"), per_device_train_batch_size=args.batch_size,
        max_steps=count, learning_rate=5e-6, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", beta=0.1, max_length=args.max_length, gradient_checkpointing=False,
        bf16=row.precision == "bf16", use_cpu=device == "cpu", report_to=[], save_strategy="no", logging_steps=1,
        dataloader_num_workers=0, seed=args.seed, precompute_ref_log_probs=False, disable_tqdm=True,
    )
    timer = trl_step_timer(device)
    rates = matmul_rates(device, args.matmul_size, repeats=3)
    trainer = in_order_dpo_trainer()(model=load(), ref_model=load(), args=config, train_dataset=dataset,
                                     processing_class=tokenizer, callbacks=[timer])
    prepared = trainer.train_dataset
    same = all(prepared[j][key] == pairs[i][key] for j, i in enumerate(order)
               for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
    if not same:
        raise RuntimeError("TRL tokenized the workload differently: the comparison would not be like for like")
    trainer.train()
    tokens = [sum(2 * len(pairs[i]["prompt_ids"]) + len(pairs[i]["chosen_ids"]) + len(pairs[i]["rejected_ids"])
                  for i in order[k * args.batch_size:(k + 1) * args.batch_size]) for k in range(count)]
    measured = timer.times[args.warmup:]
    result = summarize(measured, tokens[args.warmup:], batch_size=args.batch_size,
                       step_cpu=timer.cpu[args.warmup:] if device == "cpu" else None)

    def padded_width(pair: dict[str, Any]) -> int:
        return len(pair["prompt_ids"]) + max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))

    batch_of = [order[k * args.batch_size:(k + 1) * args.batch_size] for k in range(count)]
    widths = [2 * args.batch_size * max(padded_width(pairs[i]) for i in batch_of[k]) for k in range(args.warmup, count)]
    result["computed_tokens_per_step"] = statistics.mean(widths)
    result["useful_tokens_per_step"] = statistics.mean(tokens[args.warmup:])
    result["peak_memory_mb"] = peak_memory_mb(device)
    result["same_token_ids_as_dpo"] = same
    result["matmul_gflops"] = rates
    result["trl_version"] = trl.__version__
    return result


# --------------------------------------------------------------------------------------------- orchestration


def nominal_flops_per_token(row: Row, parameters: int) -> float:
    policy = 4 if row.trains_lora else 6  # LoRA: no weight gradients for the frozen base
    reference = 0 if row.reference == "precomputed" else 2
    return (policy + reference) * parameters


def run_row_in_subprocess(row: Row, args: argparse.Namespace) -> dict[str, Any]:
    return row_in_fresh_process("benchmarks.bench_throughput", json.dumps(asdict(row)), row.name, args)


def row_in_fresh_process(module: str, row_arg: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Row `name` of benchmark `module` in a fresh interpreter, so each peak memory is that row's alone (`row_arg`
    names the row to `--_row`; `args.workdir` and `args.passthrough` are the benchmark's). It finds the module from
    any working directory: the repo root goes first on its PYTHONPATH (benchmarks/ and demo/ are not installed)."""
    out_file = Path(args.workdir) / f"row-{name.replace('/', '_')}.json"
    out_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, "--_row", row_arg, "--_row_output", str(out_file), *args.passthrough]
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
    if proc.returncode != 0 or not out_file.is_file():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(out_file.read_text())


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'row':<34} {'step s':>7} {'useful tok/s':>12} {'pairs/s':>8} {'peak MB':>8} {'MFU':>6} "
            f"{'tok/s vs TRL':>12} {'tok/CPU-s':>9} {'vs TRL':>7} {'mem vs TRL':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<34} failed: {r['error'].splitlines()[-1][:80]}")
            continue
        vs = f"{r['speedup_vs_trl']:.2f}x" if r.get("speedup_vs_trl") else "-"
        mem = f"{r['memory_vs_trl']:.2f}x" if r.get("memory_vs_trl") else "-"
        per_cpu = f"{r['useful_tokens_per_cpu_s']:.0f}" if "useful_tokens_per_cpu_s" in r else "-"
        cpu_vs = f"{r['cpu_speedup_vs_trl']:.2f}x" if r.get("cpu_speedup_vs_trl") else "-"
        lines.append(f"{r['name']:<34} {r['median_step_s']:>7.2f} {r['useful_tokens_per_s']:>12.0f} "
                     f"{r['pairs_per_s']:>8.2f} {r['peak_memory_mb']:>8.0f} {100 * r['mfu']:>5.1f}% {vs:>12} "
                     f"{per_cpu:>9} {cpu_vs:>7} {mem:>10}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_throughput", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--vs-trl", action="store_true", help="also run TRL's DPOTrainer (pip install trl)")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON results file")
    parser.add_argument("--steps", type=int, default=3, help="measured optimizer steps per row")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the matmul that measures the ceilings")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    parser.add_argument("--max-length", type=int, default=512, help="bound on prompt + answer tokens of a pair")
    parser.add_argument("--max-tokens-per-row", type=int, default=2048,
                        help="packed layouts: bound on a row's tokens (the trainer's default; prefix-shared rows "
                             "also stop at the longest pair)")
    parser.add_argument("--seed", type=int, default=0, help="fixes the text, tokenizer, model and pairs")
    parser.add_argument("--full-grid", action="store_true",
                        help="every layout x every reference strategy (default: layouts under the frozen copy, "
                             "strategies under prefix sharing)")
    parser.add_argument("--row-bounds", default="", help="extra prefix-shared rows at these max_tokens_per_row, "
                        "comma-separated")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast row")
    parser.add_argument("--rows", default="", help="comma-separated row names to run (default: all planned)")
    parser.add_argument("--hidden-size", type=int, default=MODEL_SHAPE["hidden_size"], help="model width")
    parser.add_argument("--num-layers", type=int, default=MODEL_SHAPE["num_layers"], help="decoder layers")
    parser.add_argument("--vocab-size", type=int, default=MODEL_SHAPE["vocab_size"], help="BPE vocabulary")
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu: hide any GPU")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workdir", default="bench_results/workload", help="where the workload is built")
    parser.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_row_output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.passthrough = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch-size={args.batch_size}",
                        f"--max-length={args.max_length}", f"--max-tokens-per-row={args.max_tokens_per_row}",
                        f"--seed={args.seed}", f"--threads={args.threads}", f"--matmul-size={args.matmul_size}",
                        f"--workdir={args.workdir}", f"--device={args.device}"]
    args.shape = model_shape(hidden_size=args.hidden_size, num_layers=args.num_layers, vocab_size=args.vocab_size)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cpu":  # before CUDA initialises; the row processes inherit it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    num_pairs = args.batch_size * (args.warmup + args.steps)
    if args._row is not None:  # a child process: one row
        transformers.logging.set_verbosity_error()
        row = Row(**json.loads(args._row))
        meta = json.loads((workdir / "workload.json").read_text())
        result = (run_trl_row if row.engine == "trl" else run_dpo_row)(row, meta, args)
        Path(args._row_output).write_text(json.dumps(result))
        return 0
    if args.vs_trl:
        try:
            import trl  # noqa: F401
        except ImportError:
            print("bench_throughput: --vs-trl needs trl: pip install -e '.[bench]' from the clone (or pip install trl)",
                  file=sys.stderr)
            return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    meta = build_workload(workdir, seed=args.seed, num_pairs=num_pairs, max_length=args.max_length, shape=args.shape)
    peaks = matmul_rates(device, args.matmul_size, repeats=5)
    print(f"[bench] {meta['parameters'] / 1e6:.1f}M parameters, {meta['pairs']} pairs (mean prompt "
          f"{meta['mean_prompt_tokens']:.0f} tokens, mean answer {meta['mean_answer_tokens']:.0f}), batch "
          f"{args.batch_size}, {args.warmup} warm-up + {args.steps} measured steps; matmul {peaks['fp32']:.0f} "
          f"GFLOP/s fp32, {peaks['bf16']:.0f} GFLOP/s bf16 on {device}", flush=True)
    rows = plan_rows(full_grid=args.full_grid, vs_trl=args.vs_trl, bf16=not args.no_bf16,
                     row_bounds=[int(b) for b in args.row_bounds.split(",") if b])
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [r for r in rows if r.name in wanted]
    results: list[dict[str, Any]] = []
    for row in rows:
        print(f"[bench] {row.name} ...", flush=True)
        result = {"name": row.name, **asdict(row), **run_row_in_subprocess(row, args)}
        for precision, rate in result.get("matmul_gflops", {}).items():
            peaks[precision] = max(peaks[precision], rate)
        results.append(result)
        summary = (result["error"][-300:] if "error" in result else
                   f"{result['median_step_s']:.2f} s/step, {result['useful_tokens_per_s']:.0f} useful tokens/s")
        print(f"[bench] {row.name}: {summary}", flush=True)
    # MFU against the machine's ceiling: the best matmul rate measured anywhere in the run (the machine may be
    # shared, and a rate measured under load would flatter every row).
    for row, result in zip(rows, results):
        if "error" not in result:
            flops = nominal_flops_per_token(row, meta["parameters"]) * result["useful_tokens_per_s"]
            result["model_tflops_per_s"] = flops / 1e12
            result["mfu"] = flops / (peaks[row.precision] * 1e9)
            # The same count over the tokens the layout computes (padding included, a shared prompt once): the
            # utilisation of the work actually done. MFU above 100% means the layout skips nominal work.
            computed = nominal_flops_per_token(row, meta["parameters"]) * result["computed_tokens_per_step"]
            result["hfu"] = computed / result["median_step_s"] / (peaks[row.precision] * 1e9)
    trl_row = next((r for r in results if r["engine"] == "trl" and "error" not in r), None)
    for r in results:
        if trl_row is not None and "error" not in r and r["engine"] == "dpo":
            r["speedup_vs_trl"] = r["useful_tokens_per_s"] / trl_row["useful_tokens_per_s"]
            if "useful_tokens_per_cpu_s" in r and "useful_tokens_per_cpu_s" in trl_row:
                r["cpu_speedup_vs_trl"] = r["useful_tokens_per_cpu_s"] / trl_row["useful_tokens_per_cpu_s"]
            r["memory_vs_trl"] = r["peak_memory_mb"] / trl_row["peak_memory_mb"]
    report = {
        "command": "python -m benchmarks.bench_throughput " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": hardware(), "matmul_gflops": peaks,
        "workload": {k: v for k, v in meta.items() if k not in ("model_dir", "key")} | {
            "batch_size": args.batch_size, "max_length": args.max_length, "warmup_steps": args.warmup,
            "measured_steps": args.steps, "max_tokens_per_row": args.max_tokens_per_row, **args.shape},
        "rows": results, "wall_s": time.time() - started,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print(format_table(results))
    print(f"[bench] results in {output} ({report['wall_s']:.0f} s)")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
