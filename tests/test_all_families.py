"""Every causal-LM family transformers ships: the probe's choice equals the single-sequence oracle, train and eval.

For each model type of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` that tests/family_walk.py can build tiny on a CPU (the
others are skipped with the reason), with dropout configured and then disabled as the trainer does, in train mode:

- the layout `choose_layout` picks gives each sequence's log-probs within 1e-4 nats of the oracle (each prompt +
  answer run alone, eval mode, float64 log-softmax), in eval mode and in train mode;
- no faster layout that is that exact in both modes was refused;
- a model refused for train-mode randomness really is random (two train-mode forwards of one sequence differ) or
  computes otherwise in train mode;
- the leak canary (packed rows with a plain all-ones 2D mask and row positions, so sequences see each other) is far
  off the oracle: otherwise the test could not see a leak on that family.

The README's table of the families that run one sequence per forward or are refused is generated from this test
(`python tests/test_all_families.py` rewrites it) and each family's test checks its own row - outcome, class and
reason, measured numbers aside - and that a family it cannot build has none. About 4 minutes for
all families on one CPU core (6-7 on a busy machine); `-k <model_type>` runs some.

    OMP_NUM_THREADS=1 python -m pytest tests/test_all_families.py -q -m slow [-k llama]
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from family_walk import FAMILIES, Unbuildable, build_family  # noqa: E402
from test_architectures import PAIRS  # noqa: E402  (the zoo tests' pairs: windows of 8 outrun, rows shared)

from dpo.layouts import ALL_LAYOUTS, PACKED, SINGLE, Layout, LayoutError, choose_layout, make_collate  # noqa: E402
from dpo.logprobs import sequence_logps  # noqa: E402
from dpo.masks import attention_spec  # noqa: E402
from dpo.models import disable_dropout  # noqa: E402

TOLERANCE = 1e-4  # nats per sequence
README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- family-walk:start -->", "<!-- family-walk:end -->"


LONGEST = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in PAIRS)


@torch.no_grad()
def oracle_logps(model: torch.nn.Module) -> torch.Tensor:
    """[2B] float64: chosen answers, then rejected, each sequence run alone, in the model's current mode."""
    values = []
    for key in ("chosen_ids", "rejected_ids"):
        for pair in PAIRS:
            ids = torch.tensor([pair["prompt_ids"] + pair[key]])
            logprobs = F.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
            start = len(pair["prompt_ids"])
            values.append(sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])))
    return torch.tensor(values, dtype=torch.float64)


@torch.no_grad()
def layout_logps(model: torch.nn.Module, layout: Layout) -> torch.Tensor:
    """The project's per-sequence log-probs in `layout`; a bound of 40 tokens puts several sequences in a row."""
    collate = make_collate(layout, pad_token_id=0, max_tokens_per_row=40, attention=attention_spec(model.config))
    out = sequence_logps(model, collate(PAIRS, None))
    return torch.cat([out.chosen_logps, out.rejected_logps]).double()


@torch.no_grad()
def leak_canary(model: torch.nn.Module) -> torch.Tensor:
    batch = make_collate(PACKED, pad_token_id=0, max_tokens_per_row=40)(PAIRS, None)
    batch.attention_mask = torch.ones_like(batch.input_ids)
    batch.position_ids = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids).clone()
    out = sequence_logps(model, batch)
    return torch.cat([out.chosen_logps, out.rejected_logps]).double()


def _distance(model: torch.nn.Module, layout: Layout, oracle: torch.Tensor, *, training: bool) -> float:
    model.train(training)
    try:
        return float((layout_logps(model, layout) - oracle).abs().max())
    except Exception:  # a model that cannot take the layout's inputs at all
        return float("inf")
    finally:
        model.train()


@functools.lru_cache(maxsize=None)
def outcome(family: str) -> dict[str, Any]:
    """What the probe chose for the family and how far each layout is from the oracle (eval, train)."""
    try:
        model = build_family(family, dropout=True)
        oracle = oracle_logps(model)  # eval mode: no dropout, whatever the config asks for
    except Unbuildable as exc:
        return {"skip": str(exc)}
    except Exception as exc:
        return {"skip": f"forward: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"}
    leak = float((leak_canary(model) - oracle).abs().max())
    disable_dropout(model)
    model.train()
    result: dict[str, Any] = {"class": type(model).__name__, "leak": leak}
    torch.manual_seed(0)  # a model random in train mode (a sampling router) gets the same verdict on every run
    try:
        choice = choose_layout([model], layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=2048,
                               precise=True, longest=LONGEST)
        result.update(layout=choice.layout, message=choice.message)
    except LayoutError as exc:
        result.update(layout=None, message=str(exc))
        again = [oracle_logps(model) for _ in range(2)]
        result["train_random"] = float((again[0] - again[1]).abs().max())
        result["train_off_eval"] = float((again[0] - oracle).abs().max())
    result["distance"] = {layout: (_distance(model, layout, oracle, training=False),
                                   _distance(model, layout, oracle, training=True)) for layout in ALL_LAYOUTS}
    return result


def readme_rows() -> dict[str, str]:
    """family -> its row of the README's table, as `readme_row` writes it."""
    block = README.read_text().split(START)[1].split(END)[0]
    return {m.group(1): m.group(0).strip() for m in re.finditer(r"^\| `([^`]+)` \|.*$", block, re.M)}


def readme_row(family: str, result: dict[str, Any]) -> str | None:
    """The family's row of the README's table (None: it gets a batched layout and has no row)."""
    kind = _kind(result)
    if kind is None:
        return None
    return f"| `{family}` | {kind} | {result['class']} | {_reason(result).replace('|', '/')} |"


def _numbers_masked(row: str | None) -> str | None:
    """A row with its measured numbers (and transformers' line numbers) as '#': a sampling model's gap and the last
    digits of a rounding-level one differ between runs and machines; the outcome, class and reason must not."""
    return None if row is None else re.sub(r"\d+(\.\d+)?(e-?\d+)?", "#", row)


def _kind(result: dict[str, Any]) -> str | None:
    if result.get("layout") is None and "message" in result:
        return "refused"
    return SINGLE.name if result.get("layout") == SINGLE else None


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_probe_choice_equals_the_single_sequence_oracle(family):
    result = outcome(family)
    if "skip" in result:
        assert family not in readme_rows(), "the README's family-walk table lists a family the test cannot build"
        pytest.skip(result["skip"])
    assert result["leak"] > 100 * TOLERANCE, "the leak canary shows no leak: this test would be blind here"
    distance = result["distance"]
    if result["layout"] is None:  # refused: only a model that really is random (or other) in train mode
        assert max(result["train_random"], result["train_off_eval"]) > TOLERANCE, result["message"]
    else:
        eval_gap, train_gap = distance[result["layout"]]
        assert eval_gap <= TOLERANCE and train_gap <= TOLERANCE, (result["message"], eval_gap, train_gap)
        for faster in ALL_LAYOUTS[:ALL_LAYOUTS.index(result["layout"])]:
            assert max(distance[faster]) > TOLERANCE, f"{faster.name} is exact but was refused: {result['message']}"
    assert _numbers_masked(readme_rows().get(family)) == _numbers_masked(readme_row(family, result)), (
        "the README's family-walk table is out of date: python tests/test_all_families.py rewrites it")


def _reason(result: dict[str, Any]) -> str:
    message = result["message"]
    if result["layout"] is None:
        return message.split(";")[0]
    return message.split("not padded: ")[-1].split(" [probe")[0]


def readme_table() -> str:
    rows = ["| family | outcome | class | why |", "|---|---|---|---|"]
    built = skipped = 0
    for family in FAMILIES:
        result = outcome(family)
        if "skip" in result:
            skipped += 1
            continue
        built += 1
        row = readme_row(family, result)
        if row is not None:
            rows.append(row)
    summary = (f"{built} of {len(FAMILIES)} causal-LM model types of transformers built tiny and checked; "
               f"{skipped} not buildable that way (skip reasons in the test's output).")
    return "\n".join([summary, "", *rows])


if __name__ == "__main__":  # rewrite the README's table from a full run, and list every family's outcome
    for name in FAMILIES:
        found = outcome(name)
        if "skip" in found:
            print(f"{name}: skipped: {found['skip']}")
        else:
            worst = {layout.name: max(gaps) for layout, gaps in found["distance"].items()}
            print(f"{name}: {_kind(found) or found['layout'].name}; leak {found['leak']:.3g}; oracle distance "
                  f"(eval, train) per layout {worst}; {found['message']}")
    text = README.read_text()
    head, rest = text.split(START)
    tail = rest.split(END)[1]
    README.write_text(f"{head}{START}\n{readme_table()}\n{END}{tail}")
