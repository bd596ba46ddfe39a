"""Evaluation (dpo/evaluation.py and dpo.train.evaluate): the step-0 evaluation of `eval_on_start` against a naive
per-pair forward of the two models and the loss formula, the fixed seeded subset of `eval_max_pairs`, the
longest-first batch plan worked by hand, progress and duration in a redirected log, the progress postfix of the
step just finished, the report plot from step 0, and resuming without a second step 0."""

from __future__ import annotations

import math
import re

import datasets
import pytest
import torch

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.errors import UserError
from dpo.evaluation import eval_batch_size, eval_plan, eval_subset
from dpo.metrics import PAIR_METRICS, pair_values, read_metrics
from dpo.models import load_causal_lm
from dpo.progress import progress_bar
from dpo.train import show_step, train

BETA = 0.1


# ------------------------------------------------------------------------------------------------ the plan


def test_eval_subset_is_fixed_seeded_and_covers_the_split_across_seeds():
    first = eval_subset(50, max_pairs=10, seed=3)
    assert first == eval_subset(50, max_pairs=10, seed=3)  # the same subset at every evaluation
    assert len(first) == len(set(first)) == 10 and first == sorted(first) and set(first) <= set(range(50))
    assert eval_subset(50, max_pairs=10, seed=4) != first  # the seed draws it
    assert set().union(*(eval_subset(50, max_pairs=10, seed=s) for s in range(100))) == set(range(50))  # not a prefix
    assert eval_subset(7, max_pairs=None, seed=0) == eval_subset(7, max_pairs=7, seed=0) == list(range(7))
    assert eval_subset(7, max_pairs=99, seed=0) == list(range(7))


def _lengths_dataset(longest: list[int]) -> datasets.Dataset:
    """Pairs whose longest sequence (prompt + the longer answer) has the given token counts."""
    rows = []
    for n in longest:
        prompt = n // 2
        rows.append({"prompt_ids": list(range(prompt)), "chosen_ids": [1] * (n - prompt), "rejected_ids": [2]})
    return datasets.Dataset.from_list(rows)


def test_eval_plan_by_hand_longest_first_no_repeated_pairs():
    """Lengths [3, 9, 5, 9, 1, 7, 4]: longest first, ties in index order -> pairs [1, 3, 5, 2, 6, 0, 4]."""
    dataset = _lengths_dataset([3, 9, 5, 9, 1, 7, 4])
    cfg = TrainConfig(eval_batch_size=2)
    two = [eval_plan(dataset, cfg, num_processes=2, process_index=p) for p in (0, 1)]
    assert [b for b, _ in two[0].batches] == [[1, 3], [6, 0]]
    assert two[1].batches == [([5, 2], [1.0, 1.0]), ([4], [1.0])]  # a short last batch, no filler
    assert two[0].global_pairs == [4, 3] and two[0].num_pairs == 7
    three = [eval_plan(dataset, cfg, num_processes=3, process_index=p) for p in (0, 1, 2)]
    assert [plan.batches[1] for plan in three] == [([4], [1.0]), ([4], [0.0]), ([4], [0.0])]  # one weight-0 pair
    assert three[0].global_pairs == [6, 1]
    one = eval_plan(dataset, TrainConfig(batch_size=3), num_processes=1, process_index=0)
    assert one.batch_size == eval_batch_size(TrainConfig(batch_size=3)) == 6  # default: twice the training batch
    assert one.batches == [([1, 3, 5, 2, 6, 0], [1.0] * 6), ([4], [1.0])]
    subset = eval_plan(dataset, TrainConfig(eval_max_pairs=3, seed=5), num_processes=1, process_index=0)
    assert sorted(subset.batches[0][0]) == eval_subset(7, max_pairs=3, seed=5)


def test_eval_config_is_checked(tmp_path):
    assert load_config(["--eval_on_start", "--eval_max_pairs", "8"]).eval_on_start is True
    (tmp_path / "recipe.yaml").write_text("eval_on_start: true\neval_max_pairs: 64\n")
    from_yaml = load_config(["--config", str(tmp_path / "recipe.yaml")])
    assert from_yaml.eval_on_start is True and from_yaml.eval_max_pairs == 64
    assert load_config([]).eval_on_start is False and load_config([]).eval_max_pairs is None
    for flag in ("--eval_max_pairs", "--eval_batch_size"):
        with pytest.raises(ConfigError, match=flag[2:]):
            load_config([flag, "0"])


def test_logps_accuracy_is_the_policy_preferring_chosen_ties_not_counted():
    chosen, rejected = torch.tensor([-1.0, -3.0, -2.0]), torch.tensor([-2.0, -1.0, -2.0])
    zero = torch.zeros(3)
    values = pair_values(losses=zero, chosen_rewards=zero, rejected_rewards=zero, policy_chosen_logps=chosen,
                         policy_rejected_logps=rejected, ref_chosen_logps=None)
    assert values["logps/accuracies"].tolist() == [1.0, 0.0, 0.0]
    assert values["rewards/accuracies"].tolist() == [0.0, 0.0, 0.0]  # step 0: every implicit reward ties


# ------------------------------------------------------------------------------------------------ the postfix


def _redraws(text: str, prefix: str) -> list[str]:
    return [seg for seg in re.split(r"[\r\n]", text) if seg.startswith(prefix)]


def test_progress_postfix_is_the_step_just_finished(tmp_path):
    """Every redraw (interval 0: one per step) shows the loss of the step its count says; the old order (update,
    then set_postfix) showed the step before, which this check tells apart."""
    losses = {1: 0.1111, 2: 0.2222, 3: 0.3333}
    with open(tmp_path / "new.log", "w") as log:
        bar = progress_bar(total=3, initial=0, enabled=True, file=log, log_interval_s=0.0)
        for step, loss in losses.items():
            show_step(bar, {"loss": loss, "rewards/accuracies": 0.5})
        bar.close()
    with open(tmp_path / "old.log", "w") as log:
        bar = progress_bar(total=3, initial=0, enabled=True, file=log, log_interval_s=0.0)
        for step, loss in losses.items():
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", acc="0.50", refresh=False)
        bar.close()

    def shown(path) -> list[tuple[int, str]]:
        out = []
        for line in _redraws(path.read_text(), "dpo:"):
            count = re.search(r" (\d)/3 ", line)
            loss = re.search(r"loss=([0-9.]+)", line)
            if count and int(count.group(1)) > 0:
                out.append((int(count.group(1)), loss.group(1) if loss else ""))
        return out

    new = shown(tmp_path / "new.log")
    assert {step for step, _ in new} == {1, 2, 3}
    assert all(loss == f"{losses[step]:.4f}" for step, loss in new), new
    assert (2, f"{losses[1]:.4f}") in shown(tmp_path / "old.log")  # the bug the test guards against


# ------------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A policy and a different reference model (so every step-0 metric is non-trivial), 12 eval pairs."""
    root = tmp_path_factory.mktemp("eval_inputs")
    tokenizer = make_tokenizer()
    return {"model": str(make_model_dir(root / "model", tokenizer, seed=0)),
            "ref": str(make_model_dir(root / "ref", tokenizer, seed=1)),
            "data": str(make_data_dir(root / "data", tokenizer, n_train=16, n_eval=12, seed=0))}


def run(inputs, out, *flags: str) -> dict:
    return train(load_config(["--model_path", inputs["model"], "--ref_model_path", inputs["ref"], "--data_path",
                              inputs["data"], "--output_dir", str(out), "--batch_size", "4", "--learning_rate",
                              "1e-3", "--seed", "7", *flags]))


def answer_logp(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """Summed log-prob of `answer` after `prompt`: one unpadded forward of the sequence alone."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logps[len(prompt) - 1:].sum())


def naive_eval(inputs, indices: list[int] | None = None) -> dict[str, float]:
    """The untrained policy against the reference on the eval pairs, pair by pair: sigmoid DPO loss, β = 0.1."""
    policy, reference = load_causal_lm(inputs["model"]), load_causal_lm(inputs["ref"])
    pairs = datasets.load_from_disk(f"{inputs['data']}/eval")
    rows = []
    for i in indices if indices is not None else range(len(pairs)):
        p = pairs[i]
        pc, pr = (answer_logp(policy, p["prompt_ids"], p[k]) for k in ("chosen_ids", "rejected_ids"))
        rc, rr = (answer_logp(reference, p["prompt_ids"], p[k]) for k in ("chosen_ids", "rejected_ids"))
        chosen_reward, rejected_reward = BETA * (pc - rc), BETA * (pr - rr)
        rows.append({"loss": math.log1p(math.exp(-(chosen_reward - rejected_reward))),
                     "rewards/chosen": chosen_reward, "rewards/rejected": rejected_reward,
                     "rewards/margins": chosen_reward - rejected_reward,
                     "rewards/accuracies": float(chosen_reward > rejected_reward), "logps/chosen": pc,
                     "logps/rejected": pr, "logps/accuracies": float(pc > pr), "logratio/chosen": pc - rc})
    return {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]} | {"num_pairs": len(rows)}


def assert_matches(record: dict, expected: dict) -> None:
    assert set(PAIR_METRICS) <= set(expected)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


def test_eval_on_start_logs_the_untrained_model_at_step_0(inputs, tmp_path, capsys):
    """Step 0 in metrics.jsonl and TensorBoard equals the naive evaluation; progress and duration reach a
    redirected log; training itself is the same as without the extra evaluation; the plot starts at step 0."""
    out = tmp_path / "on"
    run(inputs, out, "--max_steps", "2", "--eval_on_start")
    logged = capsys.readouterr()
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    assert_matches(evals[0], naive_eval(inputs))
    assert re.search(r"\[dpo\] eval at step 0: 12 pairs in [0-9.]+ s \([0-9.]+ pairs/s\); loss ", logged.out)
    assert any("12/12" in line for line in _redraws(logged.err, "eval:")), logged.err[-2000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = {e.step: e.value for e in events.Scalars("eval/logps/accuracies")}
    assert sorted(scalars) == [0, 2] and scalars[0] == pytest.approx(evals[0]["logps/accuracies"])

    plain = tmp_path / "off"
    run(inputs, plain, "--max_steps", "2")
    without = read_metrics(plain)
    assert [r for r in without if r["split"] == "eval"][0]["step"] == 2
    for a, b in zip([r for r in read_metrics(out) if r["split"] == "train"],
                    [r for r in without if r["split"] == "train"], strict=True):
        assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in PAIR_METRICS), a["step"]

    import matplotlib

    matplotlib.use("Agg")
    from dpo.report import draw_figure

    figure = draw_figure(read_metrics(out), "run")
    eval_lines = [line for line in figure.axes[0].lines if "(eval)" in line.get_label()]
    assert list(eval_lines[0].get_xdata()) == [0, 2]
    accuracy = {line.get_label() for line in figure.axes[3].lines}
    assert any(label.startswith("log-prob accuracy") for label in accuracy), accuracy


def test_eval_max_pairs_evaluates_the_same_seeded_subset_each_time(inputs, tmp_path, capsys):
    out = tmp_path / "subset"
    run(inputs, out, "--max_steps", "2", "--eval_on_start", "--eval_max_pairs", "5", "--eval_steps", "1",
        "--save_steps", "1")
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2] and {r["num_pairs"] for r in evals} == {5}
    assert_matches(evals[0], naive_eval(inputs, eval_subset(12, max_pairs=5, seed=7)))
    # Resumed at step 1: no second "step 0" of weights that are not the starting model's; the first one is kept.
    capsys.readouterr()
    run(inputs, out, "--max_steps", "3", "--eval_on_start", "--eval_max_pairs", "5", "--eval_steps", "1",
        "--resume_from_checkpoint", "latest")
    assert "eval_on_start: no step-0 evaluation when resuming at step 1" in capsys.readouterr().out
    evals = [r for r in read_metrics(out) if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1, 2, 3]


def test_eval_on_start_without_an_eval_split_is_refused_before_writing(inputs, tmp_path):
    tokenizer = make_tokenizer()
    data = make_data_dir(tmp_path / "data", tokenizer, n_train=8, n_eval=0, seed=0)
    with pytest.raises(UserError, match="eval_on_start: .* has no eval split"):
        train(load_config(["--model_path", inputs["model"], "--data_path", str(data), "--output_dir",
                           str(tmp_path / "out"), "--eval_on_start", "--max_steps", "1"]))
    assert not (tmp_path / "out").exists()


def test_an_eval_batch_that_does_not_fit_names_the_flag(inputs, tmp_path):
    """A real tiny model whose forward runs out of device memory (raised by a hook: the CPU never does): one line
    naming --eval_batch_size at half the batch, and the policy back in training mode."""
    from builders import accelerator
    from dpo.data import load_split
    from dpo.layouts import make_collate
    from dpo.reference import make_reference
    from dpo.train import evaluate

    cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--batch_size", "3"])
    policy = load_causal_lm(inputs["model"]).train()

    def out_of_memory(*_):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    policy.register_forward_pre_hook(out_of_memory)
    reference = make_reference("model", cfg, model=load_causal_lm(inputs["ref"]).eval())
    collate = make_collate("padded", pad_token_id=0, max_tokens_per_row=2048)
    with pytest.raises(UserError, match=r"a batch of 6 eval pairs does not fit .* --eval_batch_size 3$"):
        evaluate(policy, reference, load_split(inputs["data"], "eval"), collate, cfg, accelerator())
    assert policy.training
