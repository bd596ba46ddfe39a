"""Every layout the project uses is exact on every architecture, against an independent per-sequence oracle.

The oracle runs each prompt + answer alone (no padding, no packing, no mask) and takes a float64 log-softmax. For each
family of tests/model_zoo.py (windows and chunks of 8 tokens, shorter than the test prompts) and each layout:
the probe of dpo.layouts accepts the layout exactly when the layout equals the oracle (no wrong layout used, no
needless fallback), the default choice equals the oracle in eval and in train mode, and a negative control (packed
rows whose sequences may see each other) is far off the oracle, so each test can see a leak on its architecture.
"""

from __future__ import annotations

import functools
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_zoo import WINDOW, ZOO, build

from dpo.layouts import (
    FASTEST_FIRST,
    PACKED,
    PACKED_SHARED,
    PADDED,
    SHARED,
    Layout,
    LayoutError,
    choose_layout,
    make_collate,
    probe_layouts,
)
from dpo.logprobs import sequence_logps
from dpo.masks import AttentionSpec, MaskRule, attention_spec, build_attention_mask
from dpo.models import disable_dropout
from dpo.prefix_sharing import collate_prefix_shared

TOLERANCE = 1e-4  # nats per sequence, against the float64 oracle
README = Path(__file__).resolve().parents[1] / "README.md"


def make_pairs() -> list[dict[str, list[int]]]:
    """Prompts longer than the windows (30 and 17 > 8), short ones that share rows, a 1-token prompt."""
    rng = random.Random(1)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, 97) for _ in range(n)]

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
            for p, c, r in [(30, 6, 9), (17, 12, 4), (3, 5, 5), (1, 3, 2), (9, 2, 14)]]


PAIRS = make_pairs()


def oracle_logps(model: torch.nn.Module, pairs: list[dict]) -> torch.Tensor:
    """[2B] float64: chosen answers, then rejected, each sequence run alone."""
    values = []
    for key in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            ids = torch.tensor([pair["prompt_ids"] + pair[key]])
            with torch.no_grad():
                logprobs = F.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
            start = len(pair["prompt_ids"])
            values.append(sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])))
    return torch.tensor(values, dtype=torch.float64)


def layout_logps(model: torch.nn.Module, layout: Layout, pairs: list[dict], *, bound: int = 40) -> torch.Tensor:
    """The project's per-sequence log-probs in `layout`; a bound of 40 tokens puts several sequences in a row."""
    collate = make_collate(layout, pad_token_id=0, max_tokens_per_row=bound, attention=attention_spec(model.config))
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, None))
    return torch.cat([out.chosen_logps, out.rejected_logps]).double()


def leaky_logps(model: torch.nn.Module, pairs: list[dict]) -> torch.Tensor:
    """Negative control: the packed rows with a plain causal mask over the whole row and row positions, so each
    sequence also sees the sequences before it in its row."""
    batch = make_collate(PACKED, pad_token_id=0, max_tokens_per_row=40)(pairs, None)
    batch.attention_mask = torch.ones_like(batch.input_ids)
    batch.position_ids = torch.arange(batch.input_ids.shape[1]).expand_as(batch.input_ids).clone()
    with torch.no_grad():
        out = sequence_logps(model, batch)
    return torch.cat([out.chosen_logps, out.rejected_logps]).double()


@functools.lru_cache(maxsize=None)
def verdicts(name: str) -> dict:
    """Per architecture, computed once: the oracle's distance of every layout, the probe's verdicts, the default."""
    model = build(name)
    oracle = oracle_logps(model, PAIRS)
    distance = {}
    for layout in FASTEST_FIRST:
        try:
            distance[layout] = float((layout_logps(model, layout, PAIRS) - oracle).abs().max())
        except Exception:  # a model that cannot take the layout's inputs at all (BLOOM and a 4D mask)
            distance[layout] = float("inf")
    probed = probe_layouts(model, attention_spec(model.config), FASTEST_FIRST[:3], pad_token_id=0,
                           max_tokens_per_row=2048, precise=True, stop_at_first=False)
    default = choose_layout([model], layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=2048,
                            precise=True)
    windowless = None
    if attention_spec(model.config).longest_restriction and distance[PACKED_SHARED] <= TOLERANCE:
        # Second negative control: the shared layout with the windows and chunks left out of the mask (what the
        # project did before) must be off the oracle, or the windows of this test would not bite.
        collate = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=40)
        with torch.no_grad():
            out = sequence_logps(model, collate(PAIRS, None))
        windowless = float((torch.cat([out.chosen_logps, out.rejected_logps]).double() - oracle).abs().max())
    return {"distance": distance, "probe": {r.layout: r.exact for r in probed}, "default": default,
            "leak": float((leaky_logps(model, PAIRS) - oracle).abs().max()), "windowless": windowless}


@pytest.mark.parametrize("name", list(ZOO))
def test_probe_accepts_exactly_the_layouts_that_equal_the_oracle(name):
    result = verdicts(name)
    assert result["distance"][PADDED] <= TOLERANCE, "the padded baseline itself is off the oracle"
    assert result["leak"] > 100 * TOLERANCE, "the negative control shows no leak: this test would be blind"
    if result["windowless"] is not None:
        assert result["windowless"] > 100 * TOLERANCE, "ignoring the windows changes nothing: they do not bite"
    for layout, accepted in result["probe"].items():
        exact = result["distance"][layout] <= TOLERANCE
        assert accepted == exact, (f"{layout.name}: probe says {'exact' if accepted else 'not exact'}, oracle "
                                   f"distance {result['distance'][layout]:.3g}")


@pytest.mark.parametrize("name", list(ZOO))
def test_default_layout_equals_the_oracle_in_train_mode_with_dropout_configured(name):
    """A model whose config asks for dropout everywhere, with dropout disabled as the trainer does, in train mode:
    the default layout's log-probs equal the eval-mode oracle, and two forwards agree bit for bit."""
    model = build(name, dropout=True)
    oracle = oracle_logps(model, PAIRS)  # eval mode: no dropout whatever the config says
    disable_dropout(model)
    model.train()
    layout = verdicts(name)["default"].layout
    first, second = layout_logps(model, layout, PAIRS), layout_logps(model, layout, PAIRS)
    assert torch.equal(first, second)
    assert float((first - oracle).abs().max()) <= TOLERANCE


def test_dropout_kept_as_float_attributes_is_disabled_too():
    """OPT, GPTBigCode and XGLM copy their rates into plain float attributes: zeroing nn.Dropout modules and the
    config alone leaves train-mode forwards random (the negative control here)."""
    for name in ("opt", "gpt_bigcode", "xglm"):
        model = build(name, dropout=True).train()
        ids = torch.tensor([PAIRS[0]["prompt_ids"]])
        for module in model.modules():  # what a modules-and-config-only switch-off would do
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        assert not torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits), name
        disable_dropout(model)
        assert torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits), name


# ------------------------------------------------------------------------------- what the default picks, and why

# Families whose default is not the fastest layout, and the reason class the log line must give.
EXPECTED_FALLBACKS = {
    "bloom": PADDED, "falcon_alibi": PADDED,  # ALiBi built from a 2D mask: a 4D mask cannot be given at all
    "mpt": PACKED,  # ALiBi from token order in the row: exact packed (one sequence per block), not shared
    "lfm2": PADDED, "qwen3_next": PADDED, "granitemoehybrid": PADDED,  # convolution / linear attention / SSM layers
}


@pytest.mark.parametrize("name", list(ZOO))
def test_default_is_the_fastest_exact_layout(name):
    choice = verdicts(name)["default"]
    assert choice.layout == EXPECTED_FALLBACKS.get(name, PACKED_SHARED)
    if choice.layout != PACKED_SHARED:
        assert re.match(rf"\[dpo\] layout: {choice.layout.name} on (sdpa|eager): not packed with prefix sharing: ",
                        choice.message), choice.message


def readme_layout_table() -> dict[str, str]:
    text = README.read_text()
    block = text.split("<!-- layouts-table:start -->")[1].split("<!-- layouts-table:end -->")[0]
    rows = [line for line in block.splitlines() if line.startswith("| `")]
    return {re.match(r"\| `([^`]+)`", row).group(1): row.split("|")[2].strip() for row in rows}


def test_readme_table_of_default_layouts_matches_the_tests():
    table = readme_layout_table()
    assert set(table) == set(ZOO)
    for name in ZOO:
        assert table[name] == verdicts(name)["default"].layout.name, name


# ------------------------------------------------------------------------------- explicit requests and precision


def test_explicit_request_that_cannot_be_exact_is_refused_with_the_measured_difference():
    model = build("mpt")
    with pytest.raises(LayoutError) as refused:
        choose_layout([model], layout="packed", prefix_sharing=True, pad_token_id=0, max_tokens_per_row=2048,
                      precise=True)
    message = str(refused.value)
    assert "\n" not in message
    assert "packed with prefix sharing" in message and "MptForCausalLM" in message
    assert re.search(r"gives log-probs [0-9.e+-]+ nats away from single sequences'", message)
    # The same request on a model where it is exact is honoured, and says so.
    choice = choose_layout([build("llama")], layout="packed", prefix_sharing=True, pad_token_id=0,
                           max_tokens_per_row=2048, precise=True)
    assert choice.layout == PACKED_SHARED and "[as requested] [probe " in choice.message


def test_explicit_layout_narrows_the_candidates():
    """layout packed + sharing auto on MPT falls back within packed layouts; padded + sharing on BLOOM refuses."""
    assert choose_layout([build("mpt")], layout="packed", prefix_sharing=None, pad_token_id=0,
                         max_tokens_per_row=2048, precise=True).layout == PACKED
    with pytest.raises(LayoutError, match="BloomForCausalLM fails on it"):
        choose_layout([build("bloom")], layout="padded", prefix_sharing=True, pad_token_id=0,
                      max_tokens_per_row=2048, precise=True)


def test_probe_tolerance_in_bf16_accepts_exact_layouts_and_still_sees_a_leak():
    """In bf16 two exact layouts differ by rounding; the probe must not call that a leak, and must still reject
    the layout that is really wrong (MPT's rejected answer under prefix sharing)."""
    mistral = build("mistral_window").to(torch.bfloat16)
    exact = probe_layouts(mistral, attention_spec(mistral.config), [PACKED_SHARED, SHARED, PACKED], pad_token_id=0,
                          max_tokens_per_row=2048, precise=False, stop_at_first=False)
    assert all(r.exact for r in exact), [r.describe() for r in exact]
    mpt = build("mpt").to(torch.bfloat16)
    wrong = probe_layouts(mpt, attention_spec(mpt.config), [PACKED_SHARED], pad_token_id=0, max_tokens_per_row=2048,
                          precise=False)[0]
    assert not wrong.exact and wrong.max_difference > wrong.tolerance


def test_probe_length_is_the_data_s_longest_whatever_the_config_says():
    """The data's longest prompt + answer sets the probe's longest sequence, windows or not (a window the data
    never reaches cannot bite; one the config reader misses still bites within the data's lengths); without data,
    the config's windows are outrun; never beyond the model's positions."""
    from dpo.layouts import MIN_PROBE_LENGTH, probe_length

    window = AttentionSpec(rules=(("", MaskRule(window=4096)),))
    assert probe_length(window, max_positions=32768, longest=600) == 600
    assert probe_length(AttentionSpec(), max_positions=32768, longest=600) == 600
    assert probe_length(window, max_positions=32768, longest=5000) == 5000
    assert probe_length(window, max_positions=32768, longest=None) == 4096 + 8
    assert probe_length(AttentionSpec(), max_positions=32768, longest=None) == MIN_PROBE_LENGTH
    assert probe_length(window, max_positions=1024, longest=5000) == 1023


# ------------------------------------------------------------------------------------------- the masks themselves


def test_shared_mask_with_a_sliding_window_hand_worked():
    """prompt [5, 6, 7], chosen [8, 2], rejected [9, 2], window 2: a query sees keys whose sequence position is
    less than 2 before its own (q - k < 2), counted within its own sequence (the shared prompt belongs to both)."""
    pair = {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 2], "rejected_ids": [9, 2]}
    spec = AttentionSpec(rules=(("", MaskRule(window=2)),))
    batch = collate_prefix_shared([pair], pad_token_id=0, max_tokens_per_row=64, attention=spec)
    # row: 5 6 | 7 8 2 | 7 9 2   positions 0 1 | 2 3 4 | 2 3 4
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 4]]
    allowed = {0: [0], 1: [0, 1], 2: [1, 2], 3: [2, 3], 4: [3, 4], 5: [1, 5], 6: [5, 6], 7: [6, 7]}
    expected = torch.full((8, 8), float("-inf"))
    for q, keys in allowed.items():
        expected[q, keys] = 0.0
    assert torch.equal(batch.attention_mask[0, 0], expected)


def test_chunked_rule_and_mapping_per_layer_type():
    segment = torch.zeros((1, 6), dtype=torch.long)
    branch = torch.zeros((1, 6), dtype=torch.long)
    positions = torch.arange(6)[None]
    spec = AttentionSpec(rules=(("chunked_attention", MaskRule(chunk=4)), ("full_attention", MaskRule())))
    masks = build_attention_mask(segment, branch, positions, spec)
    assert set(masks) == {"chunked_attention", "full_attention"}
    seen = masks["chunked_attention"][0, 0] == 0
    assert seen[5].tolist() == [False, False, False, False, True, True]  # positions 4, 5 form the second chunk
    assert (masks["full_attention"][0, 0] == 0)[5].tolist() == [True] * 6


def test_attention_spec_reads_windows_chunks_and_recurrent_layers():
    assert attention_spec(build("mistral_window").config).rules == (("", MaskRule(window=WINDOW)),)
    gemma = attention_spec(build("gemma2").config)
    assert dict(gemma.rules) == {"full_attention": MaskRule(), "sliding_attention": MaskRule(window=WINDOW)}
    assert gemma.as_mapping
    assert dict(attention_spec(build("llama4_text").config).rules)["chunked_attention"] == MaskRule(chunk=WINDOW)
    assert attention_spec(build("lfm2").config).recurrent_types == ("conv",)
    assert not attention_spec(build("qwen2").config).as_mapping  # one rule for every layer type: one mask


# ------------------------------------------------------------------------------- end to end, one per failure class

# family -> (the layout the run must use, zoo options): windows in a single mask, windows in a mapping per layer
# type with position ids ignored by the mask builder, dropout kept in float attributes, ALiBi, a hybrid.
END_TO_END = {
    "mistral_window": PACKED_SHARED,
    "gpt_oss": PACKED_SHARED,
    "opt": PACKED_SHARED,
    "mpt": PACKED,
    "lfm2": PADDED,
}


@pytest.mark.slow  # two subprocesses per family
@pytest.mark.parametrize("name", list(END_TO_END))
def test_train_and_precompute_ref_give_oracle_log_probs(name, tmp_path):
    """`python -m dpo.train` with the default layout: step-1 logps equal the oracle's means and the margins are 0;
    `python -m dpo.precompute_ref` stores the oracle's values pair by pair."""
    import datasets

    from builders import make_data_dir, make_tokenizer
    from dpo.metrics import read_metrics

    tokenizer = make_tokenizer()
    model = build(name, vocab_size=len(tokenizer), dropout=True, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = make_data_dir(tmp_path / "data", tokenizer, n_train=8, n_eval=4)
    pairs = [dict(p) for p in datasets.load_from_disk(str(data / "train"))]
    oracle = oracle_logps(model, pairs)

    common = ["--model_path", str(tmp_path / "model"), "--data_path", str(data)]
    run = subprocess.run([sys.executable, "-m", "dpo.train", *common, "--output_dir", str(tmp_path / "run"),
                          "--batch_size", "8", "--max_steps", "1", "--learning_rate", "1e-4"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"[dpo] layout: {END_TO_END[name].name}" in run.stdout
    step1 = next(r for r in read_metrics(tmp_path / "run") if r["split"] == "train")
    assert step1["logps/chosen"] == pytest.approx(float(oracle[:8].mean()), abs=TOLERANCE)
    assert step1["logps/rejected"] == pytest.approx(float(oracle[8:].mean()), abs=TOLERANCE)
    assert abs(step1["rewards/margins"]) <= 1e-6

    pre = subprocess.run([sys.executable, "-m", "dpo.precompute_ref", *common, "--splits", "train"],
                         capture_output=True, text=True, timeout=600)
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert f"[precompute_ref] layout: {END_TO_END[name].name}" in pre.stdout
    stored = datasets.load_from_disk(str(data / "train"))
    values = torch.tensor(list(stored["ref_chosen_logps"]) + list(stored["ref_rejected_logps"]),
                          dtype=torch.float64)
    assert float((values - oracle).abs().max()) <= TOLERANCE


@pytest.mark.slow  # a subprocess
def test_an_explicit_layout_that_cannot_be_exact_exits_2_with_one_line(tmp_path):
    from builders import make_data_dir, make_tokenizer

    tokenizer = make_tokenizer()
    build("mpt", vocab_size=len(tokenizer)).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    data = make_data_dir(tmp_path / "data", tokenizer, n_train=8, n_eval=0)
    run = subprocess.run([sys.executable, "-m", "dpo.train", "--model_path", str(tmp_path / "model"), "--data_path",
                          str(data), "--output_dir", str(tmp_path / "run"), "--batch_size", "8", "--max_steps", "1",
                          "--layout", "packed", "--prefix_sharing", "true"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.startswith("dpo.train:")]
    assert len(lines) == 1 and "Traceback" not in run.stderr
    assert "packed with prefix sharing" in lines[0] and "MptForCausalLM" in lines[0] and "nats" in lines[0]
    assert not (tmp_path / "run" / "final").exists()


def test_data_shape_and_pairs_without_a_prompt_are_never_shared():
    import datasets

    from dpo.layouts import data_shape

    rows = [{"prompt_ids": [1, 5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 9, 2]},
            {"prompt_ids": [], "chosen_ids": [7, 2], "rejected_ids": [2]}]
    shape = data_shape(datasets.Dataset.from_list(rows[:1]), None, datasets.Dataset.from_list(rows))
    assert shape.longest == 3 + 4 and shape.empty_prompts
    assert not data_shape(datasets.Dataset.from_list(rows[:1])).empty_prompts
    choice = choose_layout([build("llama")], layout="auto", prefix_sharing=None, pad_token_id=0,
                           max_tokens_per_row=2048, precise=True, empty_prompts=True)
    assert choice.layout == PACKED and "empty prompt" in choice.message
