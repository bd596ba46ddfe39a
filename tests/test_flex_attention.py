"""The FlexAttention path (`--attn_implementation flex_attention`): block masks from the same rules as the dense
masks, forwards equal to the dense path's on every family of tests/model_zoo.py, and the choice of implementation.

On a CPU, torch 2.13's FlexAttention runs forwards only (no backward), which is what the probe, the frozen
reference and precompute_ref need. Most tests run FlexAttention uncompiled (`eager_flex`: transformers compiles it
for every new shape, ~10 s each on this CPU); the compiled kernels, which skip masked blocks using the BlockMask's
block tables, are checked end to end by the precompute_ref test.
"""

from __future__ import annotations

import copy
import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_zoo import ZOO, build
from test_architectures import PAIRS, TOLERANCE, oracle_logps, verdicts
from torch.nn.attention.flex_attention import create_mask, flex_attention

from dpo.attention import AttentionUnavailable, mask_form, resolve_attn_implementation
from dpo.config import TrainConfig
from dpo.data import collate_packed
from dpo.layouts import FASTEST_FIRST, PACKED, PACKED_SHARED, PADDED, choose_layout, make_collate, probe_layouts
from dpo.logprobs import sequence_logps
from dpo.masks import (
    CHOSEN,
    PAD,
    REJECTED,
    SHARED,
    AttentionSpec,
    MaskRule,
    SegmentMask,
    attention_spec,
    build_attention_mask,
    mask_bytes,
)
from dpo.prefix_sharing import collate_prefix_shared
from dpo.reference import make_reference


@pytest.fixture
def eager_flex(monkeypatch):
    """FlexAttention without torch.compile inside transformers' flex forward (same mask_mod, same results)."""
    from transformers.integrations import flex_attention as hf_flex

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


def random_rows(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of packed prefix-shared pairs and plain sequences with padding: (segment, branch, position_ids)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(3):
        segment, branch, position = [], [], []
        for slot in range(rng.randint(1, 3)):
            prompt, chosen, rejected = rng.randint(1, 9), rng.randint(1, 7), rng.randint(1, 7)
            if rng.random() < 0.5:  # a shared pair
                parts = [(prompt - 1, 0, SHARED), (chosen + 1, prompt - 1, CHOSEN),
                         (rejected + 1, prompt - 1, REJECTED)]
            else:  # a plain sequence
                parts = [(prompt + chosen, 0, SHARED)]
            for n, first, code in parts:
                segment += [slot] * n
                branch += [code] * n
                position += list(range(first, first + n))
        rows.append((segment, branch, position))
    width = max(len(r[0]) for r in rows) + 2
    out = [torch.full((len(rows), width), fill, dtype=torch.long) for fill in (-1, PAD, 0)]
    for r, values in enumerate(rows):
        for tensor, row in zip(out, values):
            tensor[r, :len(row)] = torch.tensor(row)
    return out[0], out[1], out[2]


SPECS = {
    "causal": AttentionSpec(),
    "window": AttentionSpec(rules=(("", MaskRule(window=3)),)),
    "chunks": AttentionSpec(rules=(("", MaskRule(chunk=4)),)),
    "per layer type": AttentionSpec(rules=(("full_attention", MaskRule()), ("sliding_attention", MaskRule(window=2)),
                                           ("chunked_attention", MaskRule(chunk=3)))),
}


@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_masks_allow_exactly_what_the_dense_masks_allow(spec_name, seed):
    """Element by element (the BlockMask's mask_mod evaluated on the whole grid) and block by block (every block
    holding an allowed element is kept, so the kernel never skips a key it must see)."""
    spec = SPECS[spec_name]
    segment, branch, position = random_rows(seed)
    dense = build_attention_mask(segment, branch, position, spec)
    block = build_attention_mask(segment, branch, position, spec, form="block")
    assert isinstance(block, SegmentMask)
    built = block.block_masks()
    dense_by_type = dense if isinstance(dense, dict) else {"": dense}
    built_by_type = built if isinstance(built, dict) else {"": built}
    assert dense_by_type.keys() == built_by_type.keys()
    rows, width = segment.shape
    for name, mask in dense_by_type.items():
        allowed = mask[:, 0] == 0
        grid = create_mask(built_by_type[name].mask_mod, rows, 1, width, width, device="cpu")[:, 0]
        assert torch.equal(grid, allowed), name
        blocks = built_by_type[name].to_dense()[:, 0].bool()  # [R, T/128, T/128]: one 128 block here
        assert bool(blocks.all()) == bool(allowed.any())


def test_block_mask_memory_grows_with_blocks_not_with_tokens_squared():
    """A row of 2,048 tokens: the dense mask holds T^2 float32 (16 MiB); the block form holds the three [R, T] tensors
    and (T/128)^2-sized block tables."""
    width = 2048
    segment = (torch.arange(width) // 300)[None]
    position = (torch.arange(width) % 300)[None]
    branch = torch.full_like(segment, SHARED)
    dense = build_attention_mask(segment, branch, position, AttentionSpec())
    block = build_attention_mask(segment, branch, position, AttentionSpec(), form="block")
    assert mask_bytes(dense) == width * width * 4
    blocks = (width // 128) ** 2
    assert mask_bytes(block) <= 3 * width * 8 + 8 * blocks * 8  # index tables: a few int32/int64 per block
    assert mask_bytes(block) < mask_bytes(dense) / 100


def test_mask_forms_of_each_implementation_and_collates():
    assert [mask_form(i) for i in ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")] == [
        "dense", "dense", "block", "varlen", "varlen"]
    pairs = PAIRS[:3]
    varlen = collate_packed(pairs, pad_token_id=0, max_tokens_per_row=40, mask_form="varlen")
    assert varlen.attention_mask is None  # the restarting position ids alone mark the sequences
    with pytest.raises(ValueError, match="custom mask"):
        collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=40, mask_form="varlen")
    block = collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=40, mask_form="block")
    dense = collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=40)
    assert torch.equal(block.input_ids, dense.input_ids) and isinstance(block.attention_mask, SegmentMask)


# ----------------------------------------------------------------------------------------------- the model zoo


def flex_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model)
    twin.set_attn_implementation("flex_attention")
    return twin


def flex_logps(model: torch.nn.Module, layout, *, mask_mod=None) -> torch.Tensor:
    collate = make_collate(layout, pad_token_id=0, max_tokens_per_row=40, attention=attention_spec(model.config),
                           mask_form="block")
    batch = collate(PAIRS, None)
    if mask_mod is not None:
        batch.attention_mask = batch.attention_mask.block_masks(mask_mod=mask_mod)
    with torch.no_grad():
        out = sequence_logps(model, batch)
    return torch.cat([out.chosen_logps, out.rejected_logps]).double()


@functools.lru_cache(maxsize=None)
def flex_support(name: str) -> str | None:
    """Why a family cannot run FlexAttention on this CPU (None: it can)."""
    model = build(name)
    if not type(model)._supports_flex_attn:
        return "transformers has no FlexAttention for it"
    if getattr(model.config, "sliding_window", None) and name == "gpt_oss":
        return "attention sinks: transformers runs them with FlexAttention on CUDA only"
    return None


FLEX_FAMILIES = [name for name in ZOO if flex_support(name) is None]


def test_most_families_have_flex_attention():
    """The list the zoo tests below cover (a transformers upgrade that drops support shows here)."""
    assert {"llama", "qwen2_window", "gemma3_text", "mistral_window", "olmo3", "llama4_text"} <= set(FLEX_FAMILIES)
    assert len(FLEX_FAMILIES) >= 15


@pytest.mark.parametrize("name", FLEX_FAMILIES)
def test_flex_forward_equals_the_dense_path_and_the_probe_agrees(name, eager_flex):
    """For every layout the dense path gets exact on this family (tests/test_architectures.py's verdicts, computed
    once per process), the flex path equals the per-sequence oracle within 1e-4 nats; the probe, run on the flex
    model, picks the same layout as on the dense one; a mask_mod that lets the sequences of a row see each other is
    far off (the comparison can see a leak)."""
    model = build(name)
    oracle = oracle_logps(model, PAIRS)
    twin = flex_copy(model)
    dense = verdicts(name)
    exact_dense = [layout for layout in FASTEST_FIRST if dense["distance"][layout] <= TOLERANCE]
    assert PADDED in exact_dense
    for layout in exact_dense:
        if layout != PADDED:
            gap = float((flex_logps(twin, layout) - oracle).abs().max())
            assert gap <= TOLERANCE, f"{name} {layout.name}: flex is {gap:.3g} nats off"
    flex_choice = choose_layout([twin], layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=2048,
                                precise=True)
    assert flex_choice.layout == dense["default"].layout
    assert flex_choice.mask_form == "block" and "on flex_attention" in flex_choice.message
    if exact_dense[0] != PADDED:

        def sees_everything_before(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        leak = float((flex_logps(twin, exact_dense[0], mask_mod=sees_everything_before) - oracle).abs().max())
        assert leak > 100 * TOLERANCE, f"{name}: the negative control is only {leak:.3g} off"


@pytest.mark.parametrize("name", ["llama", "qwen2_window", "gemma3_text"])
def test_frozen_reference_forward_on_flex_equals_the_dense_reference(name, eager_flex):
    """The frozen-copy reference (`Reference.logps`, no grad) on a flex model, packed and shared rows with block
    masks, against the same reference on sdpa with dense masks."""
    model = build(name)
    twin = flex_copy(model)
    spec = attention_spec(model.config)
    dense = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=40, attention=spec)(PAIRS, None)
    block = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=40, attention=spec,
                         mask_form="block")(PAIRS, None)
    cfg = TrainConfig(logits_chunk_size=64)
    expected = make_reference("model", cfg, model=model).logps(dense)
    got = make_reference("model", cfg, model=twin).logps(block)
    for e, g in zip(expected, got):
        assert torch.allclose(e.double(), g.double(), atol=TOLERANCE, rtol=0)


def test_probe_with_flex_compares_with_the_padded_layout_of_the_same_kernel(eager_flex):
    """probe_layouts on a flex model checks (layout, flex_attention) pairs: block masks, and a window that bites."""
    model = flex_copy(build("qwen2_window"))
    results = probe_layouts(model, attention_spec(model.config), [PACKED_SHARED, PACKED], pad_token_id=0,
                            max_tokens_per_row=2048, precise=True, stop_at_first=False)
    assert all(r.exact for r in results), [r.describe() for r in results]


# ------------------------------------------------------------------------------------------ choosing a kernel


def save_tiny(tmp_path: Path, name: str = "llama") -> str:
    model = build(name)
    model.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def test_auto_picks_flex_on_cuda_and_sdpa_on_cpu(tmp_path):
    path = save_tiny(tmp_path)
    assert resolve_attn_implementation("auto", path, device_type="cuda", needs_backward=True) == "flex_attention"
    assert resolve_attn_implementation("auto", path, device_type="cpu", needs_backward=True) == "sdpa"
    assert resolve_attn_implementation("eager", path, device_type="cpu", needs_backward=True) == "eager"
    # A no-grad forward may use FlexAttention on a CPU (precompute_ref, a frozen reference).
    assert resolve_attn_implementation("flex_attention", path, device_type="cpu",
                                       needs_backward=False) == "flex_attention"


@pytest.mark.parametrize("requested, device, needle", [
    ("flex_attention", "cpu", "no FlexAttention backward on CPU"),
    ("flash_attention_2", "cpu", "CUDA GPUs only"),
    ("flash_attention_2", "cuda", "flash-attn package"),
    ("flash_attention_3", "cuda", "flash-attn-3 package"),
])
def test_an_implementation_that_cannot_run_is_refused_in_one_line(tmp_path, requested, device, needle):
    path = save_tiny(tmp_path)
    with pytest.raises(AttentionUnavailable, match=needle) as info:
        resolve_attn_implementation(requested, path, device_type=device, needs_backward=True)
    assert "\n" not in str(info.value)


def test_a_model_without_the_kernel_is_refused_and_auto_falls_back(tmp_path):
    unsupported = [name for name in ZOO if not type(build(name))._supports_flex_attn]
    assert unsupported, "every zoo family supports FlexAttention now: pick another refusal example"
    path = save_tiny(tmp_path, unsupported[0])
    with pytest.raises(AttentionUnavailable, match="does not support it"):
        resolve_attn_implementation("flex_attention", path, device_type="cuda", needs_backward=True)
    assert resolve_attn_implementation("auto", path, device_type="cuda", needs_backward=True) in ("sdpa", "eager")


@pytest.mark.slow  # a subprocess
def test_train_refuses_flex_on_a_cpu_with_exit_2_before_writing(tmp_path):
    path = save_tiny(tmp_path)
    (tmp_path / "data" / "train").mkdir(parents=True)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dpo.train", "--model_path", path, "--data_path",
                           str(tmp_path / "data"), "--output_dir", str(out), "--attn_implementation", "flex_attention"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no FlexAttention backward on CPU" in lines[0], proc.stderr[-2000:]
    assert not out.exists()


# ------------------------------------------------------------------------------------------------- benchmarks


def test_bench_masks_counts_t_squared_dense_and_far_less_block(tmp_path):
    from benchmarks import bench_masks

    output = tmp_path / "masks.json"
    assert bench_masks.main(["--lengths", "256,1024", "--output", str(output)]) == 0
    rows = json.loads(output.read_text())["rows"]
    for row in rows:
        rules = 1 if row["layer_rules"] == "one rule" else 2
        assert row["dense_bytes"] == 4 * row["tokens_per_row"] ** 2 * rules  # float32 [1, 1, T, T] per rule
        # The block form: segment, branch and positions (int64 each) plus a few int32 tables per 128-block row.
        blocks = -(-row["tokens_per_row"] // 128)
        assert 3 * 8 * row["tokens_per_row"] <= row["block_bytes"] <= 3 * 8 * row["tokens_per_row"] + rules * 64 * (
            blocks * blocks + blocks)
    assert [r["tokens_per_row"] for r in rows] == [256, 256, 1024, 1024]


@pytest.mark.slow  # four tiny training rows
def test_bench_long_runs_both_configurations_on_a_cpu(tmp_path):
    from benchmarks import bench_long

    output = tmp_path / "long.json"
    assert bench_long.main(["--shape", "tiny", "--lengths", "96", "--longest", "160", "--steps", "1", "--warmup", "1",
                            "--workdir", str(tmp_path / "work"), "--output", str(output)]) == 0
    rows = {r["name"]: r for r in json.loads(output.read_text())["rows"]}
    assert set(rows) == {"default@96", "padded_sdpa@96", "default@160/batch1/checkpointing",
                         "padded_sdpa@160/batch1/checkpointing"}
    assert rows["default@96"]["attn_implementation"] == "sdpa"  # auto on a CPU
    assert rows["padded_sdpa@96"]["layout"] == "padded"
    # The same pairs in both layouts: the same useful tokens; the shared layout computes fewer.
    assert rows["default@96"]["useful_tokens_per_step"] == rows["padded_sdpa@96"]["useful_tokens_per_step"]
    assert rows["default@96"]["computed_tokens_per_step"] < rows["padded_sdpa@96"]["computed_tokens_per_step"]
