"""Training on prompts with k scored answers, end to end: each objective's step-1 loss and the eval metrics against a
float64 oracle (every answer's log-prob from its own forward, a reference model other than the policy), in the
k-branch layout and the fallbacks; k = 2 equal to today's pairwise run; resume; the precomputed reference (one value
per answer); LoRA with adapters disabled; ZeRO-3 on two processes."""

from __future__ import annotations

import itertools
import math
import random
import shutil
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from builders import make_model_dir, make_tokenizer, restamp
from dpo.config import load_config
from dpo.metrics import read_metrics
from dpo.precompute_ref import main as precompute_main
from dpo.train import train
from tests.test_distributed import assert_close_weights, free_port, launch_cmd, run_launch
from tests.test_listwise import tau_b

pytestmark = pytest.mark.slow
BETA = 0.1


def make_ranked_records(tokenizer, n: int, *, seed: int, k_max: int = 4) -> list[dict]:
    """Sums with 2..k_max answers, scored by how far the answer is from the true sum (ties included)."""
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    records = []
    for number in range(n):
        a, b = rng.randint(0, 29), rng.randint(0, 29)
        k = k_max if number % 3 else rng.randint(2, k_max)
        values = [a + b] + [a + b + d for d in rng.sample([-3, -2, -1, 1, 2, 3], k - 1)]
        rng.shuffle(values)
        answers = [tokenizer(f" {v}." if rng.random() < 0.7 else f" the answer is {v}.",
                             add_special_tokens=False).input_ids + [eos] for v in values]
        scores = [float(-abs(v - a - b)) for v in values]
        best, worst = scores.index(max(scores)), len(scores) - 1 - scores[::-1].index(min(scores))
        records.append({"prompt_ids": tokenizer(f"what is {a} plus {b}?").input_ids, "responses_ids": answers,
                        "scores": scores, "chosen_ids": answers[best], "rejected_ids": answers[worst]})
    return records


def write_data(path: Path, tokenizer, splits: dict[str, list[dict]]) -> str:
    path.mkdir(parents=True)
    for name, records in splits.items():
        datasets.Dataset.from_list(records).save_to_disk(str(path / name))
    tokenizer.save_pretrained(path / "tokenizer")
    restamp(path, {"pairs_written": {name: len(r) for name, r in splits.items()},
                   "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "bos_token_id": tokenizer.bos_token_id})
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranked_inputs")
    tokenizer = make_tokenizer()
    train_records = make_ranked_records(tokenizer, 8, seed=0)
    eval_records = make_ranked_records(tokenizer, 6, seed=1)
    pairs = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"], "rejected_ids": r["rejected_ids"]}
             for r in train_records]
    two = [dict(r, responses_ids=[r["chosen_ids"], r["rejected_ids"]], scores=[1.0, 0.0]) for r in pairs]
    return {"model": str(make_model_dir(root / "model", tokenizer, seed=0)),
            "ref": str(make_model_dir(root / "ref", tokenizer, seed=1)),
            "data": write_data(root / "data", tokenizer, {"train": train_records, "eval": eval_records}),
            "pairs": write_data(root / "pairs", tokenizer, {"train": pairs}),
            "two": write_data(root / "two", tokenizer, {"train": two})}


def run(inputs, out: Path, *flags: str, data: str = "data") -> list[dict]:
    train(load_config(["--model_path", inputs["model"], "--ref_model_path", inputs["ref"], "--data_path",
                       inputs[data], "--output_dir", str(out), "--batch_size", "8", "--learning_rate", "1e-3",
                       "--seed", "7", "--beta", str(BETA), *flags]))
    return read_metrics(out)


def answer_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logps[len(prompt) - 1:].sum())


def oracle(inputs, split: str) -> list[tuple[list[float], list[float]]]:
    """(h, scores) of every record: h_i = beta (log pi - log ref) of each answer, each from its own float64
    forward of the policy and of the reference."""
    policy, ref = (AutoModelForCausalLM.from_pretrained(inputs[k]).double().eval() for k in ("model", "ref"))
    out = []
    for record in datasets.load_from_disk(f"{inputs['data']}/{split}"):
        h = [BETA * (answer_logp(policy, record["prompt_ids"], a) - answer_logp(ref, record["prompt_ids"], a))
             for a in record["responses_ids"]]
        out.append((h, record["scores"]))
    return out


def oracle_loss(name: str, h: list[float], s: list[float]) -> float:
    order = sorted(range(len(s)), key=lambda i: -s[i])
    if name in ("all_pairs", "best_vs_rest"):
        pairs = [(i, j) for i, j in itertools.permutations(range(len(s)), 2) if s[i] > s[j]
                 and (name == "all_pairs" or i == order[0])]
        return sum(math.log1p(math.exp(-(h[i] - h[j]))) for i, j in pairs) / len(pairs)
    if name == "plackett_luce":
        hs = [h[i] for i in order]
        return -sum(hs[i] - math.log(sum(math.exp(x) for x in hs[i:])) for i in range(len(hs) - 1)) / (len(hs) - 1)
    negatives = [j for j in range(len(s)) if s[j] < s[order[0]]]
    return math.log1p(math.exp(math.log(sum(math.exp(h[j] - h[order[0]]) for j in negatives))))


@pytest.mark.parametrize("name", ["all_pairs", "best_vs_rest", "plackett_luce", "softmax_negatives"])
def test_step_one_loss_equals_the_float64_oracle(inputs, tmp_path, capsys, name):
    """One step over all 8 training prompts (4, 3 or 2 answers each) in the fastest exact layout (k branches per
    prompt): the logged step-1 loss is the untrained policy's mean objective over them."""
    records = run(inputs, tmp_path, "--listwise_loss", name, "--max_steps", "1", "--do_eval", "false")
    out = capsys.readouterr().out
    assert "[dpo] layout: packed with prefix sharing" in out
    assert "[dpo] ranked data: up to 4 scored answers per prompt" in out and f"listwise_loss {name}" in out
    step = next(r for r in records if r["split"] == "train")
    expected = sum(oracle_loss(name, h, s) for h, s in oracle(inputs, "train")) / 8
    assert step["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("layout", [("--layout", "padded", "--prefix_sharing", "false"),
                                    ("--layout", "packed", "--prefix_sharing", "false"),
                                    ("--layout", "single")], ids=["padded", "packed", "single"])
def test_fallback_layouts_equal_the_oracle(inputs, tmp_path, layout):
    records = run(inputs, tmp_path, "--listwise_loss", "all_pairs", "--max_steps", "1", "--do_eval", "false",
                  *layout)
    step = next(r for r in records if r["split"] == "train")
    expected = sum(oracle_loss("all_pairs", h, s) for h, s in oracle(inputs, "train")) / 8
    assert step["loss"] == pytest.approx(expected, rel=1e-5)


def test_eval_metrics_equal_the_oracle(inputs, tmp_path):
    records = run(inputs, tmp_path, "--listwise_loss", "plackett_luce", "--max_steps", "1", "--eval_on_start",
                  "true")
    start = next(r for r in records if r["split"] == "eval" and r["step"] == 0)
    rows = oracle(inputs, "eval")
    pairs = [(h[i] > h[j]) for h, s in rows for i, j in itertools.permutations(range(len(s)), 2) if s[i] > s[j]]
    assert start["rewards/accuracies"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-9)
    top = [s[max(range(len(h)), key=h.__getitem__)] == max(s) for h, s in rows]
    assert start["ranking/top_accuracy"] == pytest.approx(sum(top) / len(rows), rel=1e-9)
    tau = [tau_b(h, s) for h, s in rows]
    assert start["ranking/kendall_tau"] == pytest.approx(sum(tau) / len(rows), rel=1e-4)
    ranked = [[h[i] for i in sorted(range(len(s)), key=lambda i: -s[i])] for h, s in rows]
    for rank in range(1, 5):
        values = [r[rank - 1] for r in ranked if len(r) >= rank]
        assert start[f"rewards/rank_{rank}"] == pytest.approx(sum(values) / len(values), rel=1e-4, abs=1e-6)
    assert start["loss"] == pytest.approx(sum(oracle_loss("plackett_luce", h, s) for h, s in rows) / len(rows),
                                          rel=1e-5)


def test_two_answers_equal_the_pairwise_run_exactly(inputs, tmp_path):
    """The same pairs three ways: pairwise data as today, pairwise data read as k = 2 (--listwise_loss), and
    ranked k = 2 data; three steps each, every logged value and the final weights equal."""
    flags = ("--max_steps", "3", "--batch_size", "4", "--logging_steps", "1")
    today = run(inputs, tmp_path / "today", *flags, data="pairs")
    as_two = run(inputs, tmp_path / "as_two", *flags, "--listwise_loss", "all_pairs", data="pairs")
    ranked = run(inputs, tmp_path / "ranked", *flags, "--listwise_loss", "best_vs_rest", data="two")
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm")
    for other in (as_two, ranked):
        assert [[r[k] for k in keys] for r in other] == [[r[k] for k in keys] for r in today]
    base = load_file(str(tmp_path / "today" / "final" / "model.safetensors"))
    for name in ("as_two", "ranked"):
        other = load_file(str(tmp_path / name / "final" / "model.safetensors"))
        assert all(torch.equal(base[k], other[k]) for k in base), name


def test_resume_equals_uninterrupted(inputs, tmp_path):
    """A run cut after checkpoint-2 and resumed logs what the uninterrupted run logs, and ends in its weights."""
    flags = ("--listwise_loss", "softmax_negatives", "--batch_size", "2", "--max_steps", "5", "--save_steps", "2",
             "--logging_steps", "1", "--eval_steps", "3")
    run(inputs, tmp_path / "full", *flags)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    shutil.rmtree(interrupted / "final")
    shutil.rmtree(interrupted / "checkpoint-4")
    resumed = run(inputs, interrupted, *flags, "--resume_from_checkpoint", "latest")
    full = read_metrics(tmp_path / "full")
    assert [(r["step"], r["split"]) for r in full] == [(r["step"], r["split"]) for r in resumed]
    for a, b in zip(full, resumed):
        for key in ("loss", "rewards/accuracies", "ranking/kendall_tau", "rewards/rank_1"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), (a["step"], key)
    base = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    other = load_file(str(interrupted / "final" / "model.safetensors"))
    for name, value in base.items():
        torch.testing.assert_close(other[name], value, rtol=1e-6, atol=1e-6)


def test_precomputed_reference_stores_one_value_per_answer(inputs, tmp_path):
    """precompute_ref on k-answer data: `ref_logps` holds each answer's reference log-prob (the float64 oracle's),
    the pairwise columns the best and the worst answer's; training on them equals training with the model."""
    data = str(shutil.copytree(inputs["data"], tmp_path / "data"))
    assert precompute_main(["--model_path", inputs["model"], "--ref_model_path", inputs["ref"], "--data_path", data,
                            "--batch_size", "3"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(inputs["ref"]).double().eval()
    for split in ("train", "eval"):
        for row in datasets.load_from_disk(f"{data}/{split}"):
            expected = [answer_logp(ref, row["prompt_ids"], a) for a in row["responses_ids"]]
            assert row["ref_logps"] == pytest.approx(expected, rel=1e-5)
            s = row["scores"]
            best, worst = s.index(max(s)), len(s) - 1 - s[::-1].index(min(s))
            assert (row["ref_chosen_logps"], row["ref_rejected_logps"]) == (row["ref_logps"][best],
                                                                            row["ref_logps"][worst])
    flags = ("--listwise_loss", "plackett_luce", "--max_steps", "3", "--batch_size", "4", "--eval_steps", "3")
    pre = run(dict(inputs, pre=data), tmp_path / "pre", *flags, "--reference", "precomputed", data="pre")
    model = run(inputs, tmp_path / "model", *flags, "--reference", "model")
    assert [(r["step"], r["split"]) for r in pre] == [(r["step"], r["split"]) for r in model]
    for a, b in zip(pre, model):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "ranking/kendall_tau", "rewards/rank_3"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_lora_reference_is_the_base_with_adapters_disabled(inputs, tmp_path):
    """LoRA: the policy with its adapters switched off is the reference; equal to a frozen copy of the base."""
    flags = ("--listwise_loss", "all_pairs", "--lora", "true", "--max_steps", "3", "--batch_size", "4",
             "--learning_rate", "1e-2", "--eval_steps", "3")
    off = run(dict(inputs, ref=inputs["model"]), tmp_path / "off", *flags, "--reference", "adapters_disabled")
    copy = run(dict(inputs, ref=inputs["model"]), tmp_path / "copy", *flags, "--reference", "model")
    assert abs(off[-1]["rewards/margins"]) > 1e-4  # the adapters moved the policy away from the reference
    for a, b in zip(off, copy):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "ranking/kendall_tau"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.mark.distributed
def test_zero3_on_two_processes_reproduces_one_process(inputs, tmp_path):
    """Two ZeRO-3 processes x batch 2 against one process x batch 4, softmax_negatives, a different reference (an
    inference engine sharded like the policy): every logged value and the final weights."""
    flags = ["--model_path", inputs["model"], "--ref_model_path", inputs["ref"], "--data_path", inputs["data"],
             "--listwise_loss", "softmax_negatives", "--max_steps", "2", "--learning_rate", "1e-3", "--seed", "7",
             "--eval_steps", "2", "--logging_steps", "1"]
    run_launch(launch_cmd("zero3", [*flags, "--batch_size", "2", "--output_dir", str(tmp_path / "two")],
                          num_processes=2, port=free_port()))
    train(load_config([*flags, "--batch_size", "4", "--output_dir", str(tmp_path / "one")]))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two):
        for key in ("loss", "rewards/chosen", "rewards/accuracies", "ranking/kendall_tau", "rewards/rank_2",
                    "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], a["split"], key)
    # Absolute, as tests/test_distributed.py's ZeRO-3 weights: 2 Adam steps of lr 1e-3 move a weight by up to 2e-3;
    # summation-order noise in a near-zero gradient passes through Adam's normalisation to ~1e-6 of that (a relative
    # bound failed on such an entry: 3e-6 absolute, 2e-4 relative), while a wrong step would be off by ~1e-3.
    assert_close_weights(load_file(str(tmp_path / "two" / "final" / "model.safetensors")),
                         load_file(str(tmp_path / "one" / "final" / "model.safetensors")), atol=1e-5)


@pytest.mark.distributed
def test_precompute_on_two_processes_stores_every_answer_once(inputs, tmp_path):
    """Two processes each compute a slice of the records (k = 2..4 answers, NaN past a record's own k in the
    gathered rows); the stored values equal one process's."""
    one, two = (str(shutil.copytree(inputs["data"], tmp_path / name)) for name in ("one", "two"))
    flags = ["--model_path", inputs["model"], "--ref_model_path", inputs["ref"], "--batch_size", "2"]
    assert precompute_main([*flags, "--data_path", one]) == 0
    run_launch(launch_cmd("ddp", [*flags, "--data_path", two], num_processes=2, port=free_port(),
                          module="dpo.precompute_ref"))
    for split in ("train", "eval"):
        a, b = (datasets.load_from_disk(f"{d}/{split}") for d in (one, two))
        assert [len(v) for v in a["ref_logps"]] == [len(r) for r in a["responses_ids"]]
        for x, y in zip(a["ref_logps"], b["ref_logps"]):
            assert y == pytest.approx(x, rel=1e-5, abs=1e-5)
