"""dpo/recipe_data.py: a recipe's raw data is mixed by weight and seed, prepared once, and reused until an input,
the tokenizer or a prep option changes. Oracles: hand counts of the mixture's rows per source, the prepared pairs
traced back to their source rows, and the cache entries on disk."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import Dataset, DatasetDict

from builders import make_model_dir, make_tokenizer
from dpo import recipe_data
from dpo.config import ConfigError, TrainConfig, load_config
from dpo.errors import UserError
from dpo.mixture import MixtureError, parse_mixture
from dpo.recipe_data import RECORD_NAME, ensure_prepared, held_out, summary, weighted_rows

ROOT = Path(__file__).resolve().parents[1]


def explicit_rows(tag: str, n: int) -> list[dict]:
    return [{"prompt": f"what is {i} plus {tag}?", "chosen": f" the answer is {i}.", "rejected": f" no {i}.",
             "extra": i} for i in range(n)]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_data")
    model = make_model_dir(root / "model", make_tokenizer(), seed=0)
    DatasetDict({"train": Dataset.from_list(explicit_rows("1", 40)), "test": Dataset.from_list(explicit_rows("2", 10))}
                ).save_to_disk(str(root / "a"))
    (root / "b").mkdir()
    (root / "b" / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in explicit_rows("3", 30)))
    return {"model": model, "a": root / "a", "b": root / "b"}


def config(local, tmp_path, mixture, **more) -> TrainConfig:
    return TrainConfig(model_path=str(local["model"]), dataset_mixture=mixture,
                       data_cache_dir=str(tmp_path / "cache"), **more)


def test_weighted_rows_keep_int_w_n_rows_by_seed():
    rows = list(range(50))
    kept = weighted_rows(rows, 0.3, seed=0)
    assert len(kept) == 15 and kept == sorted(set(kept)) and set(kept) <= set(rows)
    assert kept == weighted_rows(rows, 0.3, seed=0) and kept != weighted_rows(rows, 0.3, seed=1)
    assert weighted_rows(rows, None, seed=0) == weighted_rows(rows, 1.0, seed=0) == rows
    assert len(held_out(100, 0.25, seed=0)) == 25 and len(held_out(100, 7, seed=0)) == 7
    with pytest.raises(MixtureError, match="leaves no training rows"):
        held_out(10, 10, seed=0)


@pytest.mark.parametrize("mixture, words", [
    ({}, "non-empty list"),
    ({"datasets": [{"split": "train"}]}, "with an id"),
    ({"datasets": [{"id": "a", "weight": 1.5}]}, "weight"),
    ({"datasets": [{"id": "a", "colums": ["x"]}]}, "unknown keys colums"),
    ({"datasets": [{"id": "a"}], "test_split_size": -1}, "test_split_size"),
    ({"datasets": [{"id": "a"}], "eval_datasets": [{"id": "b", "weight": 0.5}]}, "held out whole"),
])
def test_bad_mixtures_are_refused_at_load(mixture, words):
    with pytest.raises(MixtureError, match=words):
        parse_mixture(mixture)
    with pytest.raises(ConfigError, match=words):
        TrainConfig(dataset_mixture=mixture)


def test_mixture_counts_per_source(local, tmp_path):
    """40 rows of a at weight 0.5 -> 20, 30 rows of b whole -> 30; 10 of the 50 held out; a's test split held out
    whole. Every prepared pair is traced to its source by its prompt."""
    mixture = {"datasets": [{"id": str(local["a"]), "split": "train", "weight": 0.5},
                            {"id": str(local["b"]), "columns": ["prompt", "chosen", "rejected"]}],
               "eval_datasets": [{"id": str(local["a"]), "split": "test"}], "test_split_size": 10, "seed": 3}
    lines: list[str] = []
    entry = ensure_prepared(config(local, tmp_path, mixture), lines.append)
    record = json.loads((entry / RECORD_NAME).read_text())
    by_source: dict[tuple[str, str], int] = {}
    for file in record["sources"]:
        key = (Path(file["source"].split("[")[0]).name, file["split"])
        by_source[key] = by_source.get(key, 0) + file["pairs"]
    tokenizer = make_tokenizer()
    counted: dict[tuple[str, str], int] = {}
    for split in ("train", "eval"):
        for ids in datasets.load_from_disk(str(entry / split))["prompt_ids"]:
            tag = tokenizer.decode(ids).split("plus")[1].strip(" ?")
            source = {"1": "a", "2": "a", "3": "b"}[tag]
            counted[(source, split)] = counted.get((source, split), 0) + 1
    assert counted == by_source
    assert by_source[("a", "train")] + by_source.get(("a", "eval"), 0) - 10 == 20  # 20 kept + 10 of a's test split
    assert by_source[("b", "train")] + by_source.get(("b", "eval"), 0) == 30
    assert sum(n for (_, split), n in by_source.items() if split == "eval") == 10 + 10
    assert record["pairs_written"] == {"train": 40, "eval": 20}
    assert lines[0].startswith("[dpo] data: prepared ") and str(entry) in lines[0]
    assert "40 train and 20 eval pairs" in summary(record)


def test_reused_until_an_input_tokenizer_or_option_changes(local, tmp_path):
    copy = tmp_path / "b"
    copy.mkdir()
    (copy / "part.jsonl").write_text((local["b"] / "part.jsonl").read_text())
    mixture = {"datasets": [{"id": str(copy)}]}
    lines: list[str] = []
    first = ensure_prepared(config(local, tmp_path, mixture), lines.append)
    assert ensure_prepared(config(local, tmp_path, mixture), lines.append) == first
    assert lines[0].startswith("[dpo] data: prepared") and lines[2].startswith("[dpo] data: reused")
    shorter = ensure_prepared(config(local, tmp_path, mixture, max_length=64), lines.append)
    assert shorter != first
    with (copy / "part.jsonl").open("a") as f:
        f.write(json.dumps(explicit_rows("4", 1)[0]) + "\n")
    changed = ensure_prepared(config(local, tmp_path, mixture), lines.append)
    assert changed not in (first, shorter)
    other_tokenizer = make_model_dir(tmp_path / "model2", make_tokenizer(), seed=0)
    template = other_tokenizer / "chat_template.jinja"  # the same tokenizer but its chat template
    template.write_text(template.read_text() + "{# changed #}")
    cfg = TrainConfig(model_path=str(other_tokenizer), dataset_mixture=mixture, data_cache_dir=str(tmp_path / "cache"))
    assert ensure_prepared(cfg, lines.append) not in (first, shorter, changed)
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 4
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no raw files left


def test_prepared_folder_must_match_lengths(local, tmp_path):
    entry = ensure_prepared(config(local, tmp_path, {"datasets": [{"id": str(local["b"])}]}), lambda _: None)
    recipe_data.check_prepared_lengths(TrainConfig(data_path=str(entry), max_length=1024))
    with pytest.raises(UserError, match="max_length: 512 but"):
        recipe_data.check_prepared_lengths(TrainConfig(data_path=str(entry), max_length=512))


def test_every_handbook_recipe_parses_with_one_warning_line(local, tmp_path, capsys):
    """The cheap half of tests/test_trl_recipes.py: every recipe, localised, parses; at most one warning line."""
    from test_trl_recipes import RECIPES, localised, machine_facts
    datasets_ = {name: local["a"] for name in ("HuggingFaceH4/ultrafeedback_binarized", "argilla/dpo-mix-7k",
                                               "HuggingFaceH4/cai-conversation-harmless",
                                               "HuggingFaceH4/orca_dpo_pairs", "HuggingFaceTB/smoltalk2")}
    assert len(RECIPES) == 10
    for recipe in RECIPES:
        path = localised(recipe, {"model": local["model"], "datasets": datasets_}, tmp_path)
        capsys.readouterr()
        cfg = load_config(["--config", str(path), *machine_facts()])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[dpo] warning")]
        assert len(err) <= 1, (recipe.name, err)
        assert cfg.model_path == str(local["model"]) and cfg.dataset_mixture is not None
        assert all(Path(d.id) == local["a"] for d in parse_mixture(cfg.dataset_mixture).datasets)
