"""The whole pipeline on a tiny model, on a CPU, in a few minutes - no network, no downloads.

    ./launch.sh demo [--output_dir runs/demo] [--quick] [--seed 0]   (installs the package first if it is missing)
    python -m demo [...]                                                (the same, from the repo root)

Stages, each announced as it starts:
  1. a synthetic preference dataset (demo/synthetic.py): pick the first or the last word of a list as the prompt
     asks (chosen) versus the word at the other end (rejected); a held-out split with unseen prompts;
  2. a byte-level BPE tokenizer and a tiny Llama-style model, built here from a config;
  3. data prep (`python -m data_prep`) of the raw JSONL into Arrow shards;
  4. a short supervised warm-up on the answers of the training pairs, chosen and rejected alike, so that the
     reference knows the answer format - name the first or the last word of the list - but not which one the
     prompt asks for: it prefers the chosen answer about half the time;
  5. DPO with `accelerate launch --config_file accelerate_configs/single.yaml -m dpo.train --config
     recipes/demo.yaml`;
  6. evaluation on the held-out pairs, before (the warmed-up reference) and after DPO, and `report.png`.

OUTPUT_DIR afterwards holds data/, sft/ (the warmed-up model: DPO's starting point and reference), prepped/, and
the DPO run itself: metrics.jsonl, tensorboard/, config.yaml, final/, report.png and demo_summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from demo import synthetic
from demo.tiny import build_model, build_tokenizer
from dpo.data import collate_padded, load_split
from dpo.distributed import quiet_deepspeed_accelerator_probe
from dpo.logprobs import sequence_logps
from dpo.models import load_causal_lm
from dpo.report import draw_report

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "recipes" / "demo.yaml"
ACCELERATE_CONFIG = REPO_ROOT / "accelerate_configs" / "single.yaml"
# The warm-up trains on both answers of each pair, not on the chosen ones only (the DPO paper's "preferred-FT"):
# the chosen answers alone spell out the rule, and a tiny model trained on them for 200 steps learned it outright
# for two seeds of three (held-out accuracy 0.98-1.0 before DPO), leaving DPO nothing to show. Trained on both,
# the reference learns the answer format - name the first or the last word - and, by construction, no preference.
WARMUP_ANSWERS = ("chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class DemoSize:
    """Everything the --quick flag shrinks. The full size is tuned to reach held-out accuracy >= 0.9 robustly
    (several seeds) within the 5-minute budget on 2 CPU cores; quick only has to show that DPO helps."""

    num_train: int = 3000
    num_eval: int = 300
    hidden_size: int = 64
    num_layers: int = 2
    warmup_steps: int = 300  # supervised steps on the answers: the format, without any preference
    warmup_batch_size: int = 32
    warmup_lr: float = 3e-3
    dpo_steps: int | None = None  # None: the recipe's num_epochs
    shown_generations: int = 6


QUICK = DemoSize(num_train=1024, num_eval=128, dpo_steps=120, shown_generations=3)


def stage(number: int, total: int, text: str) -> None:
    print(f"\n[demo {number}/{total}] {text}", flush=True)


# -------------------------------------------------------------------------------- 2. tokenizer and model


def build_tokenizer_and_model(records: list[dict[str, str]], size: DemoSize, *, seed: int
                              ) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """A BPE tokenizer trained on the synthetic texts (every list word becomes one token) and a fresh tiny model."""
    tokenizer = build_tokenizer(synthetic.corpus(records), vocab_size=400)
    model = build_model(vocab_size=len(tokenizer), hidden_size=size.hidden_size, num_layers=size.num_layers,
                        num_heads=4, max_position_embeddings=128, seed=seed, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer, model


# ---------------------------------------------------------------------------------------- 4. warm-up


def answers_lm_batch(pairs: list[dict[str, Any]], *, pad_token_id: int,
                     answer_keys: tuple[str, ...] = WARMUP_ANSWERS) -> dict[str, torch.Tensor]:
    """One right-padded row of prompt + answer per pair and answer key (all pairs' first answers, then the next);
    labels are the answer tokens only (-100 on prompt and padding)."""
    rows = [(list(p["prompt_ids"]), list(p[key])) for key in answer_keys for p in pairs]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[row, :n] = torch.tensor(prompt + answer)
        attention_mask[row, :n] = 1
        labels[row, len(prompt):n] = torch.tensor(answer)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def warm_up(model: PreTrainedModel, train_pairs: Any, size: DemoSize, *, pad_token_id: int, seed: int
            ) -> list[float]:
    """Supervised fine-tuning on the answers of the training pairs (WARMUP_ANSWERS): a plain AdamW loop with a
    linearly decaying learning rate; returns the loss of each step (mean NLL per answer token)."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=size.warmup_lr, weight_decay=0.0)
    model.train()
    losses = []
    order: list[int] = []
    for step in range(size.warmup_steps):
        if len(order) < size.warmup_batch_size:
            order = list(range(len(train_pairs)))
            rng.shuffle(order)
        indices, order = order[:size.warmup_batch_size], order[size.warmup_batch_size:]
        batch = answers_lm_batch([train_pairs[i] for i in indices], pad_token_id=pad_token_id)
        # The learning rate decays linearly to zero so the last steps settle rather than jump.
        for group in optimizer.param_groups:
            group["lr"] = size.warmup_lr * (1 - step / size.warmup_steps)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


# ------------------------------------------------------------------------------------- 6. evaluation


@torch.no_grad()
def pair_logps(model: PreTrainedModel, pairs: list[dict[str, Any]], *, pad_token_id: int, batch_size: int = 64
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the chosen and of the rejected answer of every pair, [N] each."""
    model.eval()
    chosen, rejected = [], []
    for start in range(0, len(pairs), batch_size):
        batch = collate_padded(pairs[start:start + batch_size], pad_token_id=pad_token_id)
        out = sequence_logps(model, batch)
        chosen.append(out.chosen_logps)
        rejected.append(out.rejected_logps)
    return torch.cat(chosen), torch.cat(rejected)


def preference_accuracy(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> float:
    """Share of pairs whose chosen answer the model finds more likely; an exact tie counts half."""
    wins = (chosen_logps > rejected_logps).float() + 0.5 * (chosen_logps == rejected_logps).float()
    return wins.mean().item()


@torch.no_grad()
def greedy_answers(model: PreTrainedModel, prompts: list[list[int]], *, pad_token_id: int, eos_token_id: int,
                   max_new_tokens: int = 4) -> list[list[int]]:
    """Greedy continuations of left-padded prompts, recomputed in full each step (a few tokens: no cache needed).
    Position ids count real tokens only, so a padded prompt is seen exactly as it was in training."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    answers: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    for _ in range(max_new_tokens):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        next_ids = logits[:, -1].argmax(-1)
        for row in range(len(prompts)):
            if not done[row]:
                answers[row].append(int(next_ids[row]))
        done |= next_ids == eos_token_id
        if bool(done.all()):
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return answers


def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


@dataclass
class Evaluation:
    preference_accuracy: float  # log pi(chosen) > log pi(rejected), held out
    reward_accuracy: float  # DPO's implicit reward: beta * (log pi - log pi_ref), chosen > rejected
    reward_margin: float  # mean of beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)]
    greedy_correct: float  # share of held-out prompts whose greedy answer is the right word
    answers: list[str]


def evaluate_model(model: PreTrainedModel, reference_logps: tuple[torch.Tensor, torch.Tensor],
                   eval_pairs: list[dict[str, Any]], prompts: list[str], tokenizer: PreTrainedTokenizerBase,
                   *, beta: float) -> Evaluation:
    pad_id = tokenizer.pad_token_id
    chosen, rejected = pair_logps(model, eval_pairs, pad_token_id=pad_id)
    ref_chosen, ref_rejected = reference_logps
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    answer_ids = greedy_answers(model, [list(p["prompt_ids"]) for p in eval_pairs], pad_token_id=pad_id,
                                eos_token_id=tokenizer.eos_token_id)
    answers = [decode_answer(tokenizer, ids) for ids in answer_ids]
    correct = [answer == synthetic.correct_answer(prompt) for answer, prompt in zip(answers, prompts)]
    return Evaluation(
        preference_accuracy=preference_accuracy(chosen, rejected),
        reward_accuracy=preference_accuracy(chosen_rewards, rejected_rewards),
        reward_margin=(chosen_rewards - rejected_rewards).mean().item(),
        greedy_correct=sum(correct) / len(correct),
        answers=answers,
    )


def format_table(before: Evaluation, after: Evaluation, *, num_eval: int) -> str:
    rows = [
        ("preference accuracy: log p(chosen) > log p(rejected)", before.preference_accuracy,
         after.preference_accuracy),
        ("implicit reward accuracy (ties count half)", before.reward_accuracy, after.reward_accuracy),
        ("reward margin, beta * log-ratio difference", before.reward_margin, after.reward_margin),
        ("greedy answer is the right word", before.greedy_correct, after.greedy_correct),
    ]
    head = f"held out ({num_eval} pairs, prompts unseen in training)"
    width = max(len(head), *(len(r[0]) for r in rows))
    lines = [f"{head:<{width}}   before    after", "-" * (width + 18)]
    lines += [f"{name:<{width}}  {b:7.3f}  {a:7.3f}" for name, b, a in rows]
    return "\n".join(lines)


def format_generations(prompts: list[str], before: list[str], after: list[str], count: int) -> str:
    lines = ["greedy generations (held out):"]
    for prompt, b, a in list(zip(prompts, before, after))[:count]:
        question = prompt.split("\n")[0]
        expected = synthetic.correct_answer(prompt)
        lines.append(f"  {question:<58} expected {expected!r:<10} before {b!r:<10} after {a!r}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ flow


def run_data_prep(raw_dir: Path, tokenizer_dir: Path, prepped_dir: Path) -> None:
    command = [sys.executable, "-m", "data_prep", "--input", str(raw_dir / "train.jsonl"),
               "--eval_input", str(raw_dir / "eval.jsonl"), "--tokenizer", str(tokenizer_dir),
               "--output", str(prepped_dir), "--max_length", "64", "--overwrite"]
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT)


def run_dpo(model_dir: Path, prepped_dir: Path, output_dir: Path, size: DemoSize, *, seed: int) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
               "-m", "dpo.train", "--config", str(RECIPE), "--model_path", str(model_dir),
               "--data_path", str(prepped_dir), "--output_dir", str(output_dir), "--seed", str(seed),
               "--overwrite_output_dir"]  # a demo run replaces the previous demo's training outputs
    if size.dpo_steps is not None:
        command += ["--max_steps", str(size.dpo_steps)]
    print("$ " + " ".join(command), flush=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=env)


def recipe_beta() -> float:
    return float(yaml.safe_load(RECIPE.read_text()).get("beta", 0.1))


def run_demo(output_dir: str | Path, size: DemoSize, *, seed: int = 0) -> dict[str, Any]:  # noqa: C901
    started = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    stages = 6

    stage(1, stages, f"synthetic preference data: {size.num_train} train + {size.num_eval} held-out pairs")
    train_path, eval_path = synthetic.write_dataset(out / "data", num_train=size.num_train,
                                                    num_eval=size.num_eval, seed=seed)
    train_records = [json.loads(line) for line in train_path.read_text().splitlines()]
    eval_records = [json.loads(line) for line in eval_path.read_text().splitlines()]
    example = train_records[0]
    print(f"  example: prompt {example['prompt']!r}\n           chosen {example['chosen']!r}  "
          f"rejected {example['rejected']!r}")

    stage(2, stages, "tokenizer and tiny Llama-style model, built locally")
    tokenizer, model = build_tokenizer_and_model(train_records, size, seed=seed)
    sft_dir = out / "sft"
    tokenizer.save_pretrained(sft_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"  vocabulary {len(tokenizer)}, hidden {size.hidden_size}, {size.num_layers} layers, {params:,} "
          f"parameters")

    stage(3, stages, "data prep: raw JSONL -> tokenized Arrow shards")
    prepped = out / "prepped"
    run_data_prep(out / "data", sft_dir, prepped)
    train_ds, eval_ds = load_split(prepped, "train"), load_split(prepped, "eval")
    train_pairs = train_ds.with_format(None).to_list()
    eval_pairs = eval_ds.with_format(None).to_list()
    # source_index maps each prepared pair back to its record, so the rule can be checked on the text.
    eval_prompts = [eval_records[p.get("source_index", i)]["prompt"] for i, p in enumerate(eval_pairs)]

    stage(4, stages, f"supervised warm-up on the answers ({size.warmup_steps} steps): the reference")
    losses = warm_up(model, train_pairs, size, pad_token_id=tokenizer.pad_token_id, seed=seed)
    print(f"  answer NLL per token {losses[0]:.3f} -> {losses[-1]:.3f}")
    model.save_pretrained(sft_dir)
    beta = recipe_beta()
    reference_logps = pair_logps(model, eval_pairs, pad_token_id=tokenizer.pad_token_id)
    before = evaluate_model(model, reference_logps, eval_pairs, eval_prompts, tokenizer, beta=beta)
    print(f"  held-out preference accuracy before DPO: {before.preference_accuracy:.3f}")

    stage(5, stages, "DPO through accelerate launch (single process)")
    run_dpo(sft_dir, prepped, out, size, seed=seed)

    stage(6, stages, "evaluation on held-out prompts, and report.png")
    policy = load_causal_lm(str(out / "final"))
    after = evaluate_model(policy, reference_logps, eval_pairs, eval_prompts, tokenizer, beta=beta)
    report_path = draw_report(out)
    print()
    print(format_table(before, after, num_eval=len(eval_pairs)))
    print()
    print(format_generations(eval_prompts, before.answers, after.answers, size.shown_generations))
    elapsed = time.perf_counter() - started
    summary = {
        "before": {k: v for k, v in asdict(before).items() if k != "answers"},
        "after": {k: v for k, v in asdict(after).items() if k != "answers"},
        "num_train": len(train_pairs), "num_eval": len(eval_pairs), "seed": seed, "beta": beta,
        "warmup_final_loss": losses[-1], "seconds": elapsed,
    }
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\n[demo] done in {elapsed:.0f} s. In {out}: metrics.jsonl, tensorboard/, final/, {report_path.name}, "
          f"demo_summary.json")
    if not math.isfinite(after.preference_accuracy):
        raise RuntimeError("evaluation produced a non-finite accuracy")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output_dir", default="runs/demo", help="where everything is written")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run (fewer pairs and steps) that still shows DPO helping; for tests")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the model and the training order")
    parser.add_argument("--num_threads", type=int, default=1,
                        help="CPU threads per process (default 1: the matrices are tiny, and on a busy 2-core machine "
                             "a second thread measured 40x slower per step, spinning instead of computing)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_deepspeed_accelerator_probe()  # this process never uses DeepSpeed; saving a model imports it
    # Applies to this process and, through the environment, to the data-prep and training subprocesses.
    os.environ["OMP_NUM_THREADS"] = str(args.num_threads)
    torch.set_num_threads(args.num_threads)
    run_demo(args.output_dir, QUICK if args.quick else DemoSize(), seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
