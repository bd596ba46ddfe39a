"""The demo's pieces: the synthetic data (deterministic, the rule holds, held-out prompts unseen), the warm-up (its
loss is the answers' NLL, computed here token by token), log-probs and greedy answers against unpadded
one-by-one computations; and `./launch.sh demo --quick` end to end (DPO raises held-out accuracy)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from demo import run, synthetic
from demo.tiny import build_model, build_tokenizer
from dpo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ synthetic data


def test_record_by_hand():
    assert synthetic.make_record(["apple", "river", "stone"], "last") == {
        "prompt": "Which word comes last: apple river stone?\nAnswer:", "chosen": " stone", "rejected": " apple"}
    assert synthetic.make_record(["apple", "river", "stone"], "first")["chosen"] == " apple"
    with pytest.raises(ValueError):
        synthetic.make_record(["apple", "river"], "middle")


def test_splits_are_deterministic_and_disjoint():
    train, held_out = synthetic.make_splits(num_train=400, num_eval=100, seed=3)
    again = synthetic.make_splits(num_train=400, num_eval=100, seed=3)
    assert (train, held_out) == again
    assert synthetic.make_splits(num_train=400, num_eval=100, seed=4)[0] != train
    assert len(train) == 400 and len(held_out) == 100
    train_prompts = {r["prompt"] for r in train}
    assert len(train_prompts) == 400
    assert not train_prompts & {r["prompt"] for r in held_out}


def test_the_rule_holds_in_every_record():
    train, held_out = synthetic.make_splits(num_train=300, num_eval=50, seed=0)
    instructions = set()
    for record in train + held_out:
        # An independent reading of the prompt text, not synthetic.parse_prompt.
        question = record["prompt"].split("\n")[0]
        instruction = question.split(":")[0].split()[-1]
        words = question.split(": ")[1].rstrip("?").split()
        instructions.add(instruction)
        assert synthetic.MIN_WORDS <= len(words) <= synthetic.MAX_WORDS and len(set(words)) == len(words)
        assert record["chosen"] == " " + (words[0] if instruction == "first" else words[-1])
        assert record["rejected"] == " " + (words[-1] if instruction == "first" else words[0])
        assert record["chosen"] != record["rejected"]
        assert synthetic.correct_answer(record["prompt"]) == record["chosen"].strip()
    assert instructions == {"first", "last"}


def test_write_dataset_jsonl(tmp_path):
    train_path, eval_path = synthetic.write_dataset(tmp_path, num_train=20, num_eval=5, seed=1)
    rows = [json.loads(line) for line in train_path.read_text().splitlines()]
    assert rows == synthetic.make_splits(num_train=20, num_eval=5, seed=1)[0]
    assert len(eval_path.read_text().splitlines()) == 5
    assert set(rows[0]) == {"prompt", "chosen", "rejected"}  # the explicit shape of data_prep


# ----------------------------------------------------------------------------------- warm-up and evaluation


@pytest.fixture(autouse=True)
def one_thread():
    """As the demo runs: one thread. With two on a busy 2-core machine a warm-up step measured 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    records, _ = synthetic.make_splits(num_train=64, num_eval=0, seed=0)
    tokenizer = build_tokenizer(synthetic.corpus(records), vocab_size=400)
    model = build_model(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=0,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    eos = tokenizer.eos_token_id
    # data_prep's explicit-shape ids: BOS + prompt, answer + EOS.
    pairs = [{"prompt_ids": tokenizer(r["prompt"]).input_ids,
              "chosen_ids": tokenizer(r["chosen"], add_special_tokens=False).input_ids + [eos],
              "rejected_ids": tokenizer(r["rejected"], add_special_tokens=False).input_ids + [eos]}
             for r in records]
    return tokenizer, model, pairs


def naive_answer_logps(model, prompt: list[int], answer: list[int]) -> list[float]:
    """Log-prob of each answer token, from one unpadded forward of prompt + answer."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + answer]), use_cache=False).logits[0]
    logps = torch.log_softmax(logits.double(), -1)
    return [logps[len(prompt) - 1 + k, token].item() for k, token in enumerate(answer)]


def test_answers_lm_batch_by_hand():
    batch = run.answers_lm_batch([{"prompt_ids": [1, 5], "chosen_ids": [7, 2], "rejected_ids": [8, 4, 2]},
                                  {"prompt_ids": [1, 5, 6], "chosen_ids": [9, 2], "rejected_ids": [3, 2]}],
                                 pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 7, 2, 0], [1, 5, 6, 9, 2], [1, 5, 8, 4, 2], [1, 5, 6, 3, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 2, -100], [-100, -100, -100, 9, 2],
                                        [-100, -100, 8, 4, 2], [-100, -100, -100, 3, 2]]


def test_warm_up_loss_is_the_answer_nll_and_falls(tiny):
    tokenizer, model, pairs = tiny
    size = run.DemoSize(warmup_steps=25, warmup_batch_size=len(pairs), warmup_lr=3e-3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    # Batch = all pairs, so the first step's loss is the mean NLL over every answer token before any update.
    tokens = [lp for p in pairs for key in run.WARMUP_ANSWERS
              for lp in naive_answer_logps(model, p["prompt_ids"], p[key])]
    expected_first = -sum(tokens) / len(tokens)
    losses = run.warm_up(model, pairs, size, pad_token_id=tokenizer.pad_token_id, seed=0)
    model.load_state_dict(start)
    again = run.warm_up(model, pairs, size, pad_token_id=tokenizer.pad_token_id, seed=0)
    model.load_state_dict(start)
    assert losses[0] == pytest.approx(expected_first, rel=1e-4)
    assert losses == again  # deterministic
    assert len(losses) == 25 and losses[-1] < losses[0] - 1.5


def test_pair_logps_and_accuracy(tiny):
    tokenizer, model, pairs = tiny
    chosen, rejected = run.pair_logps(model, pairs[:10], pad_token_id=tokenizer.pad_token_id, batch_size=4)
    for i, pair in enumerate(pairs[:10]):
        assert chosen[i].item() == pytest.approx(sum(naive_answer_logps(model, pair["prompt_ids"],
                                                                        pair["chosen_ids"])), abs=1e-4)
        assert rejected[i].item() == pytest.approx(sum(naive_answer_logps(model, pair["prompt_ids"],
                                                                          pair["rejected_ids"])), abs=1e-4)
    # 2 wins, 1 tie (half), 1 loss -> 2.5 / 4
    assert run.preference_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]),
                                   torch.tensor([0.0, 1.0, 3.0, 1.0])) == pytest.approx(0.625)


def test_greedy_answers_batched_equal_one_by_one(tiny):
    tokenizer, model, pairs = tiny
    prompts = [p["prompt_ids"] for p in pairs[:6]]
    assert len({len(p) for p in prompts}) > 1  # left padding is exercised
    batched = run.greedy_answers(model, prompts, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, max_new_tokens=3)
    for prompt, answer in zip(prompts, batched):
        ids, single = list(prompt), []
        for _ in range(3):
            with torch.no_grad():
                token = int(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            single.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids.append(token)
        assert answer == single


# -------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow  # the demo end to end through launch.sh
def test_launch_demo_quick(tmp_path):
    """`./launch.sh demo` in its reduced form: every stage runs, every output is left, DPO helps on held-out pairs."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", "python")}
    env.pop("DS_ACCELERATOR", None)  # as in a user's shell, not as an earlier in-process test left it
    done = subprocess.run(["./launch.sh", "demo", "--quick", "--output_dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # no warning from DeepSpeed, which no stage of the demo uses
    assert "Setting accelerator to CPU" not in done.stdout + done.stderr
    for number in range(1, 7):
        assert f"[demo {number}/6]" in done.stdout
    assert "greedy generations (held out):" in done.stdout
    summary = json.loads((out / "demo_summary.json").read_text())
    before, after = summary["before"], summary["after"]
    assert before["reward_margin"] == 0.0 and before["reward_accuracy"] == 0.5  # policy == reference: all ties
    assert after["reward_margin"] > 0.05
    assert after["reward_accuracy"] > 0.75
    assert after["preference_accuracy"] > before["preference_accuracy"] + 0.1
    for name in ("metrics.jsonl", "report.png", "config.yaml", "final/model.safetensors", "final/tokenizer.json",
                 "prepped/prep_report.json", "sft/model.safetensors", "data/train.jsonl"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    eval_rows = [r for r in read_metrics(out) if r["split"] == "eval"]
    # The trainer's own eval of the final step is the demo's implicit-reward accuracy, computed independently.
    assert eval_rows[-1]["rewards/accuracies"] == pytest.approx(after["reward_accuracy"], abs=0.02)
