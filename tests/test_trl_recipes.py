"""alignment-handbook's DPO recipes (tests/fixtures/alignment_handbook/, verbatim) train as they are.

Only what points outside this machine is changed: `model_name_or_path` and the dataset ids become local copies (a
tiny Llama; datasets with the real ones' splits and columns, as `save_to_disk` folders and a Hub-style Parquet
folder), and the command line adds the run's own `--output_dir`, `--data_cache_dir`, `--max_steps 2` and, to keep
the evaluation of the recipes' 500-3,000 held-out pairs to a few forwards, `--per_device_eval_batch_size 128`; plus
the machine's facts: no flash-attention kernel on a CPU (`--attn_implementation sdpa`), and on an install without
wandb / bitsandbytes, `--report_to tensorboard` / `--load_in_4bit false`.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState
from datasets import Dataset, DatasetDict

from builders import make_model_dir, make_tokenizer
from dpo.config import load_config
from dpo.metrics import read_metrics
from dpo.recipe_data import RECORD_NAME
from dpo.train import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "tests" / "fixtures" / "alignment_handbook").glob("*.yaml"))
# dataset id -> {split: rows}; the larger test_split_size of the recipes (3000) needs that many mixed rows.
SPLITS = {
    "HuggingFaceH4/ultrafeedback_binarized": {"train_prefs": 1100, "test_prefs": 1000},
    "HuggingFaceH4/cai-conversation-harmless": {"train_prefs": 500, "test_prefs": 500},
    "HuggingFaceH4/orca_dpo_pairs": {"train_prefs": 400, "test_prefs": 200},
    "argilla/dpo-mix-7k": {"train": 500, "test": 100},
    "HuggingFaceTB/smoltalk2": {"llama_3.1_tulu_3_8b_preference_mixture_no_think": 60,
                                "tulu_3_8b_pref_mix_Qwen3_32B_Qwen3_0.6B_think": 60},
}


def conversation(rng: random.Random, a: int, b: int, answer: int) -> tuple[str, list[dict], list[dict]]:
    prompt = f"what is {a} plus {b}?"
    user = {"role": "user", "content": prompt}
    wrong = answer + rng.choice([-2, -1, 1, 2])
    return prompt, [user, {"role": "assistant", "content": f"the answer is {answer}."}], \
        [user, {"role": "assistant", "content": f"the answer is {wrong}."}]


def rows(dataset_id: str, n: int, seed: int) -> list[dict]:
    """Rows with the real dataset's columns (the ones the recipes read and a few they do not)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 29), rng.randint(0, 29)
        prompt, chosen, rejected = conversation(rng, a, b, a + b)
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if dataset_id.endswith("ultrafeedback_binarized"):
            row.update(prompt_id=f"{seed}-{i}", messages=chosen, score_chosen=8.0, score_rejected=3.0)
        elif dataset_id.endswith("cai-conversation-harmless"):
            row.update(init_prompt=prompt, init_response="no.", revision_response=chosen[1]["content"])
        elif dataset_id.endswith("dpo-mix-7k"):
            row = {"dataset": "toy", "chosen": chosen, "rejected": rejected, "chosen_rating": 5.0,
                   "rejected_rating": 1.0}
        elif dataset_id.endswith("smoltalk2"):
            row["chat_template_kwargs"] = {"enable_thinking": False}
        out.append(row)
    return out


def make_datasets(root: Path) -> dict[str, Path]:
    """Local copies: ultrafeedback as a Hub-style Parquet folder, the others `save_to_disk`; smoltalk2's config
    Preference as a sub-folder."""
    paths = {}
    for number, (dataset_id, splits) in enumerate(SPLITS.items()):
        folder = root / dataset_id.replace("/", "__")
        tables = {split: Dataset.from_list(rows(dataset_id, n, seed=97 * number + i))
                  for i, (split, n) in enumerate(splits.items())}
        if dataset_id.endswith("ultrafeedback_binarized"):
            (folder / "data").mkdir(parents=True)
            for split, table in tables.items():
                table.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
        else:
            DatasetDict(tables).save_to_disk(str(folder / "Preference" if dataset_id.endswith("smoltalk2")
                                                 else folder))
        paths[dataset_id] = folder
    return paths


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("handbook")
    model = make_model_dir(root / "model", make_tokenizer(), seed=0)
    return {"model": model, "datasets": make_datasets(root / "datasets"), "root": root}


def localised(recipe: Path, local: dict, folder: Path) -> Path:
    """The recipe's text with its model and dataset ids replaced by the local copies; nothing else changed."""
    text = recipe.read_text()
    model = yaml.safe_load(text)["model_name_or_path"]
    text = text.replace(f"model_name_or_path: {model}", f"model_name_or_path: {local['model']}")
    for dataset_id, path in local["datasets"].items():
        text = text.replace(f"id: {dataset_id}\n", f"id: {path}\n").replace(f"  {dataset_id}: ", f"  {path}: ")
    path = folder / recipe.name
    path.write_text(text)
    return path


def machine_facts() -> list[str]:
    # No flash-attention kernel on a CPU; a few eval forwards for thousands of held-out pairs.
    facts = ["--attn_implementation", "sdpa", "--per_device_eval_batch_size", "128"]
    if importlib.util.find_spec("wandb") is None:
        facts += ["--report_to", "tensorboard"]
    if importlib.util.find_spec("bitsandbytes") is None:
        facts += ["--load_in_4bit", "false"]
    return facts


def run(argv: list[str]) -> None:
    """train() in this process; Accelerate's state is process-global and each recipe asks for its own precision."""
    cfg = load_config(argv)
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def dpo_warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("[dpo] warning")]


@pytest.mark.slow
def test_every_handbook_recipe_trains_two_steps(local, tmp_path, capsys):
    """Each recipe: prepared from its mixture, 2 optimizer steps, a final model, at most one warning line; the
    recipes that share a mixture and prep options share one prepared folder."""
    assert len(RECIPES) == 10
    cache = tmp_path / "cache"
    prepared: dict[str, str] = {}
    for recipe in RECIPES:
        path = localised(recipe, local, tmp_path)
        out = tmp_path / "runs" / recipe.stem
        argv = ["--config", str(path), "--output_dir", str(out), "--data_cache_dir", str(cache), "--max_steps", "2",
                *machine_facts()]
        capsys.readouterr()
        run(argv)
        captured = capsys.readouterr()
        assert len(dpo_warnings(captured.err)) <= 1, (recipe.name, dpo_warnings(captured.err))
        assert [r["step"] for r in read_metrics(out) if r["split"] == "train"][-1] == 2, recipe.name
        assert (out / "final").is_dir(), recipe.name
        line = next(line for line in captured.out.splitlines() if line.startswith("[dpo] data: "))
        entry = line.split()[3]
        assert line.startswith(("[dpo] data: prepared", "[dpo] data: reused")), line
        if line.startswith("[dpo] data: reused"):
            assert entry in prepared.values(), (recipe.name, line)
        prepared[recipe.name] = entry
        record = json.loads((Path(entry) / RECORD_NAME).read_text())
        evals = [r for r in read_metrics(out) if r["split"] == "eval"]
        assert bool(evals) == (record["pairs_written"]["eval"] > 0), recipe.name
    same = {prepared["zephyr-7b-beta__config_full.yaml"], prepared["pref_align_scan__config_zephyr.yaml"]}
    assert len(same) == 1  # the same mixture, tokenizer and lengths: prepared once
    assert len(set(prepared.values())) < len(prepared)


# `./launch.sh train --config RECIPE` twice, first with 2 processes (the main one prepares, the other waits), then
# with one that reuses the data: tests/test_readme.py::test_trl_recipe, which runs the README's two commands.


def test_trl_intervals_in_a_run(tmp_path):
    """TrainingArguments' interval forms drive a real run: 8 pairs, batch 4 -> 2 steps per epoch, 4 steps in all.
    logging_strategy epoch logs steps 2 and 4; eval_steps 0.5 (ceil(0.5 x 4) = 2) evaluates at 2 and 4; save_strategy
    epoch checkpoints at 2 (step 4 is the final model, not a checkpoint); do_eval false evaluates nothing."""
    from builders import make_data_dir
    tokenizer = make_tokenizer()
    model = make_model_dir(tmp_path / "model", tokenizer, seed=0)
    data = make_data_dir(tmp_path / "data", tokenizer, n_train=8, n_eval=4)
    common = ["--model_name_or_path", str(model), "--data_path", str(data), "--per_device_train_batch_size", "4",
              "--max_steps", "4", "--logging_strategy", "epoch", "--eval_steps", "0.5", "--save_strategy", "epoch"]
    run([*common, "--output_dir", str(tmp_path / "run")])
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows if r["split"] == "train"] == [2, 4]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [2, 4]
    assert sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*")) == ["checkpoint-2"]
    run([*common, "--output_dir", str(tmp_path / "quiet"), "--do_eval", "false"])
    assert [r for r in read_metrics(tmp_path / "quiet") if r["split"] == "eval"] == []
