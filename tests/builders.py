"""Tiny, deterministic training inputs for tests: a model folder and a prepared-data folder in data_prep's output
format (Arrow shards written with `datasets`, prep_report.json, tokenizer/), built locally in seconds.

The data are sums: "what is 3 plus 4?" -> chosen " 7." / rejected a wrong sum, so a tiny model can learn the
preference. data_prep's own tests cover the text -> ids stage; these builders write ids directly so training tests
do not depend on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets

from demo.tiny import build_model, build_tokenizer
from dpo.contract import SPLITS, PreparedData, check_data_contract, stamp_report
from dpo.data import load_split

CORPUS = [f"what is {a} plus {b}? the answer is {a + b}." for a in range(30) for b in range(30)]


def make_tokenizer():
    return build_tokenizer(CORPUS, vocab_size=320)


def make_model_dir(path: Path, tokenizer, *, seed: int = 0, hidden_size: int = 32, num_layers: int = 2) -> Path:
    model = build_model(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                        seed=seed, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_pairs(tokenizer, n: int, *, seed: int) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    eos = tokenizer.eos_token_id
    pairs = []
    for _ in range(n):
        a, b = rng.randint(0, 29), rng.randint(0, 29)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        prompt = tokenizer(f"what is {a} plus {b}?").input_ids
        # Varying lengths exercise padding and packing: a few pairs carry a longer answer.
        tail = " the answer is" if rng.random() < 0.3 else ""
        chosen = tokenizer(f"{tail} {a + b}.", add_special_tokens=False).input_ids + [eos]
        rejected = tokenizer(f"{tail} {wrong}.", add_special_tokens=False).input_ids + [eos]
        pairs.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def make_data_dir(path: Path, tokenizer, *, n_train: int = 32, n_eval: int = 12, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(make_pairs(tokenizer, n_train, seed=seed)).save_to_disk(str(path / "train"))
    if n_eval:
        datasets.Dataset.from_list(make_pairs(tokenizer, n_eval, seed=seed + 1)).save_to_disk(str(path / "eval"))
    tokenizer.save_pretrained(path / "tokenizer")
    report = {"pairs_written": {"train": n_train, "eval": n_eval}, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    restamp(path, report)
    return path


def restamp(path: Path, report: dict | None = None) -> None:
    """(Re)write path/prep_report.json with the hashes of what the folder holds now, as data_prep records them
    (dpo.contract.stamp_report): for tests that change the data as a new data_prep run would."""
    if report is None:
        report = json.loads((path / "prep_report.json").read_text())
    (path / "prep_report.json").write_text(json.dumps(stamp_report(report, path)))


def prepared(cfg) -> PreparedData:
    """cfg.data_path as training checks it (dpo.contract), quietly: what the reference decision takes."""
    return check_data_contract(cfg, {s: load_split(cfg.data_path, s) for s in SPLITS}, log=lambda _: None)


def accelerator():
    """A plain one-process Accelerator in fp32 (tests that build a reference outside dpo.train need one)."""
    from dpo.distributed import build_accelerator

    return build_accelerator(mixed_precision="no", gradient_accumulation_steps=1, max_grad_norm=1.0)


def frozen_copy_logps(reference, batch):
    """The frozen copy's log-probs on the CPU (on a GPU machine the Accelerator places the copy on the GPU)."""
    device = next(reference.model.parameters()).device
    chosen, rejected = reference.logps(batch.to(device))
    return chosen.cpu(), rejected.cpu()
