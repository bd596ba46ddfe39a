"""alignment-handbook's `dataset_mixture`, read and checked (no data is opened here): dpo/config.py validates a
recipe's mixture with it at load time, dpo/recipe_data.py prepares the data it names.

    mixture = parse_mixture({"datasets": [{"id": "uf/", "split": "train_prefs", "weight": 0.5}], "seed": 0})
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpo.errors import UserError


class MixtureError(UserError):
    """A dataset_mixture that cannot be read as written (dpo.config re-raises it as a ConfigError)."""

    label = "config error"


@dataclass(frozen=True)
class SourceSpec:
    id: str
    split: str | None
    config: str | None = None
    columns: tuple[str, ...] | None = None
    weight: float | None = None

    @property
    def label(self) -> str:
        return f"{self.id}[{self.split or 'default split'}]"


@dataclass(frozen=True)
class Mixture:
    datasets: tuple[SourceSpec, ...]
    eval_datasets: tuple[SourceSpec, ...] = ()
    test_split_size: float | None = None
    seed: int = 0


def _source(entry: Any, where: str, *, weighted: bool) -> SourceSpec:
    if not isinstance(entry, Mapping) or not isinstance(entry.get("id"), str) or not entry["id"]:
        raise MixtureError(f"{where}: expected a mapping with an id (a local dataset folder, file or name)")
    unknown = set(entry) - {"id", "config", "split", "columns", "weight"}
    if unknown:
        raise MixtureError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    columns = entry.get("columns")
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise MixtureError(f"{where}.columns: expected a list of column names")
    weight = entry.get("weight")
    if weight is not None:
        if not weighted:
            raise MixtureError(f"{where}.weight: eval_datasets are held out whole")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise MixtureError(f"{where}.weight: must be in (0, 1] (the share of its rows kept), got {weight!r}")
    return SourceSpec(entry["id"], entry.get("split"), entry.get("config"),
                      tuple(columns) if columns is not None else None, None if weight is None else float(weight))


def parse_mixture(value: Any) -> Mixture:
    """The mixture, checked: every refusal names the key."""
    if not isinstance(value, Mapping):
        raise MixtureError("dataset_mixture: expected a mapping with datasets")
    unknown = set(value) - {"datasets", "eval_datasets", "test_split_size", "seed"}
    if unknown:
        raise MixtureError(f"dataset_mixture: unknown keys {', '.join(sorted(unknown))}")
    train = value.get("datasets")
    if not isinstance(train, list) or not train:
        raise MixtureError("dataset_mixture.datasets: expected a non-empty list")
    held = value.get("eval_datasets") or []
    if not isinstance(held, list):
        raise MixtureError("dataset_mixture.eval_datasets: expected a list")
    size = value.get("test_split_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, (int, float)) or size <= 0
                             or (isinstance(size, float) and size >= 1 and not size.is_integer())):
        raise MixtureError(f"dataset_mixture.test_split_size: rows (>= 1) or a share in (0, 1), got {size!r}")
    seed = value.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise MixtureError(f"dataset_mixture.seed: expected an integer, got {seed!r}")
    return Mixture(tuple(_source(e, f"dataset_mixture.datasets[{i}]", weighted=True) for i, e in enumerate(train)),
                   tuple(_source(e, f"dataset_mixture.eval_datasets[{i}]", weighted=False)
                         for i, e in enumerate(held)),
                   None if size is None else float(size), seed)
