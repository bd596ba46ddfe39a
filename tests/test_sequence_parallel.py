"""Sequence parallelism (dpo/sequence_parallel.py): the split of a batch, the refusals, and on 2 gloo processes the
split forward and backward against the whole-row forward of the same model.

    OMP_NUM_THREADS=1 python -m pytest tests/test_sequence_parallel.py -q

Oracles: a whole row run by one process (the project's own forward, itself checked against single sequences by the
layout probe) for per-sequence log-probs; for gradients, the whole-row gradient times N = the sum over the group's
ranks (what DeepSpeed/DDP's average over N ranks turns back into the whole-row gradient). The end-to-end training
equality (2 processes at sequence_parallel_size 2 against 1 process, 5 steps) is in tests/test_sequence_parallel_run.py.
"""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dpo.attention import mask_form as attention_mask_form
from dpo.data import collate_packed, collate_padded
from dpo.distributed import release_process_groups
from dpo.errors import UserError
from dpo.layouts import PACKED, PACKED_SHARED, PADDED, SHARED, make_collate
from dpo.logprobs import sequence_logps
from dpo.masks import attention_spec
from dpo.sequence_parallel import SequenceGroup, check_run, counted, shard
from tests import model_zoo

PAIRS = [  # (prompt, chosen, rejected) lengths: a long prompt, and short pairs that pack together
    (23, 6, 9), (5, 4, 3), (7, 2, 6), (3, 5, 5),
]


def make_pairs(vocab: int, seed: int = 0) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in PAIRS]


# ------------------------------------------------------------------------------------------- the split, 1 process


def test_shard_pads_to_a_multiple_of_n_and_keeps_the_full_rows_labels() -> None:
    """3 ranks over a padded batch of width 8: padded to 9, each keeps 3 columns; the label of a slice's last
    token is the next slice's first token (shifted on the full row), and the 2D mask became the full dense mask."""
    pairs = [{"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 10, 11, 12, 2]}]
    batch = collate_padded(pairs, pad_token_id=0)
    assert batch.input_ids.shape == (2, 8)
    spec = attention_spec(types.SimpleNamespace())
    slices = [shard(batch, SequenceGroup(size=3, rank=r, data_rank=0, data_size=1), spec) for r in range(3)]
    ids = torch.cat([s.input_ids for s in slices], dim=1)
    assert ids.shape == (2, 9) and torch.equal(ids[:, :8], batch.input_ids)
    assert torch.equal(torch.cat([s.target_ids for s in slices], 1)[:, :8], batch.target_ids)
    assert torch.equal(torch.cat([s.target_seq for s in slices], 1),
                       torch.nn.functional.pad(batch.target_seq, (0, 1), value=-1))
    # Rejected row: tokens [5, 6, 8 | 9, 10, 11 | 12, 2, pad]; position 2 (token 8) predicts 9, the next slice's first.
    assert slices[0].target_ids[1, 2] == 9 and slices[0].target_seq[1, 2] == 1
    assert torch.equal(torch.cat([s.position_ids for s in slices], 1)[1], torch.arange(9))
    mask = slices[0].attention_mask
    assert mask.shape == (2, 1, 9, 9) and all(torch.equal(s.attention_mask, mask) for s in slices)
    # Chosen row: 4 real tokens, causal among them; each pad position sees only itself.
    allowed = mask[0, 0] == 0
    assert torch.equal(allowed[:4, :4], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not allowed[:4, 4:].any() and torch.equal(allowed[4:, 4:], torch.eye(5, dtype=torch.bool))


def test_shard_pads_mapping_masks_once_per_distinct_tensor() -> None:
    model = model_zoo.build("gemma3_text")
    spec = attention_spec(model.config)
    batch = collate_packed(make_pairs(97), pad_token_id=0, max_tokens_per_row=64, attention=spec)
    assert isinstance(batch.attention_mask, dict)
    width = batch.input_ids.shape[1]
    part = shard(batch, SequenceGroup(size=4, rank=1, data_rank=0, data_size=1), spec)
    padded = -(-width // 4) * 4
    assert part.input_ids.shape[1] == padded // 4
    for name, mask in part.attention_mask.items():
        assert mask.shape[-1] == padded
        assert torch.equal(mask[..., :width, :width], batch.attention_mask[name])


def test_metrics_count_each_pair_once_per_group() -> None:
    batch = collate_padded([{"prompt_ids": [5], "chosen_ids": [7], "rejected_ids": [8]}], pad_token_id=0)
    lead = replace(batch, sequence_group=SequenceGroup(size=2, rank=0, data_rank=0, data_size=1))
    other = replace(batch, sequence_group=SequenceGroup(size=2, rank=1, data_rank=0, data_size=1))
    assert counted(lead) == (batch.pair_weight, batch.num_tokens)
    weight, tokens = counted(other)
    assert tokens == 0 and float(weight.sum()) == 0.0


# ------------------------------------------------------------------------------------------- refusals


def _cfg(**changes: object) -> types.SimpleNamespace:
    base = dict(sequence_parallel_size=2, layout="auto", use_weighting=False, ld_alpha=None)
    return types.SimpleNamespace(**{**base, **changes})


@pytest.mark.parametrize("changes, processes, heads, implementation, message", [
    ({}, 3, (4, 2), "sdpa", "sequence_parallel_size 2 does not divide the 3 processes"),
    ({}, 2, (6, 3), "sdpa", "the model has 6 attention heads and 3 key/value heads; both must be divisible by 2"),
    ({"sequence_parallel_size": 4}, 4, (4, 2), "sdpa", "4 attention heads and 2 key/value heads"),
    ({}, 2, (4, 2), "flash_attention_2", "attn_implementation flash_attention_2 cannot run split yet"),
    ({"layout": "single"}, 2, (4, 2), "sdpa", "with layout single is not supported yet"),
    ({}, 2, (4, 2, ["conv", "full_attention"]), "sdpa", "layers of type conv mix a row's tokens in order"),
    ({"ld_alpha": 0.5}, 2, (4, 2), "sdpa", "with ld_alpha"),
    ({"use_weighting": True}, 2, (4, 2), "sdpa", "with use_weighting"),
])
def test_refusals_are_one_line(changes: dict, processes: int, heads: tuple, implementation: str,
                               message: str) -> None:
    config = types.SimpleNamespace(num_attention_heads=heads[0], num_key_value_heads=heads[1],
                                   layer_types=heads[2] if len(heads) > 2 else None)
    with pytest.raises(UserError, match=message) as info:
        check_run(_cfg(**changes), config, num_processes=processes, implementation=implementation)
    assert "\n" not in str(info.value)


def test_size_one_checks_nothing() -> None:
    config = types.SimpleNamespace(num_attention_heads=3, num_key_value_heads=3)
    check_run(_cfg(sequence_parallel_size=1), config, num_processes=3, implementation="flex_attention")


# ------------------------------------------------------------------------------------------- 2 processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int) -> None:
    """A spawned worker's start: gloo, and faulthandler on, so a native abort prints every thread's Python stack
    into the test's captured output instead of only "terminate called ..."."""
    faulthandler.enable(all_threads=True)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _leave() -> None:
    """A spawned worker's end, once its results are on disk: the ranks leave together, the groups are released as
    `dpo.train` releases them, and the process exits without the interpreter's teardown, where a gloo group's
    threads can still abort it (pytorch/pytorch#179291; one worker of this file died once in CI with SIGABRT,
    "terminate called without an active exception", on an otherwise green run). What the tests check is in the
    files."""
    torch.distributed.barrier()
    release_process_groups(0)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, port: int, family: str, implementation: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    _join(rank, world)
    from dpo import sequence_parallel as sp

    model = model_zoo.build(family)
    model.config._attn_implementation = implementation
    spec = attention_spec(model.config)
    form = attention_mask_form(implementation)
    grad = implementation != "flex_attention"  # torch 2.13 has no FlexAttention backward on the CPU
    pairs = make_pairs(model.config.vocab_size)
    results = {}
    batches = {}
    for layout in (PADDED, PACKED, SHARED, PACKED_SHARED):
        batch = make_collate(layout, pad_token_id=0, max_tokens_per_row=64, attention=spec, mask_form=form)(pairs,
                                                                                                            None)
        batches[layout.name] = batch
        model.zero_grad()
        with torch.set_grad_enabled(grad):
            whole = sequence_logps(model, batch)
            if grad:
                (whole.chosen_logps.sum() - 0.5 * whole.rejected_logps.sum()).backward()
        results[layout.name] = {"whole": (whole.chosen_logps.detach(), whole.rejected_logps.detach()),
                                "whole_grad": {n: p.grad.clone() for n, p in model.named_parameters()} if grad else {}}
    group = sp.setup(world)
    restore = sp.install(group, implementation)
    try:
        for name, batch in batches.items():
            model.zero_grad()
            with torch.set_grad_enabled(grad):
                split = sequence_logps(model, sp.shard(batch, group, spec, mask_form=form))
                if grad:
                    (split.chosen_logps.sum() - 0.5 * split.rejected_logps.sum()).backward()
            grads = {}
            for n, p in model.named_parameters() if grad else ():
                total = p.grad.clone()
                torch.distributed.all_reduce(total)
                grads[n] = total / world  # what a data-parallel average over the group's ranks makes of them
            results[name].update(split=(split.chosen_logps.detach(), split.rejected_logps.detach()),
                                 split_grad=grads,
                                 lengths=(split.chosen_lengths, split.rejected_lengths),
                                 local_tokens=int(sp.shard(batch, group, spec, mask_form=form).input_ids.shape[1]),
                                 width=int(batch.input_ids.shape[1]))
    finally:
        restore()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    _leave()


@pytest.mark.distributed
@pytest.mark.parametrize("family, implementation", [
    ("llama", "sdpa"),  # 4 heads, 2 key/value heads: grouped-query attention split in two
    ("gemma3_text", "eager"),  # a window of 8 tokens, shorter than the long prompt; {layer type: mask}; softcapping
    ("mistral_window", "sdpa"),  # one sliding window for every layer
    # Block masks built for the whole row from the same rules (no [T x T] tensor); forward only on the CPU. (A
    # windowed model's split forward, 2 query / 1 key-value head per rank, hits a C++ compile error in torch 2.13's
    # CPU inductor for flex_attention; its whole-row forward compiles.)
    ("llama", "flex_attention"),
])
def test_split_rows_give_the_whole_rows_log_probs_and_gradients(tmp_path, family: str, implementation: str) -> None:
    mp.spawn(_worker, args=(2, _free_port(), family, implementation, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, got in ranks[0].items():
        assert got["local_tokens"] * 2 >= got["width"] and got["local_tokens"] < got["width"], name
        for rank in ranks:  # every rank of the group holds the whole sequences' sums
            for whole, split in zip(got["whole"], rank[name]["split"]):
                torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5, msg=f"{family} {name}")
        for param, want in got["whole_grad"].items():
            scale = want.abs().max().item()
            assert scale > 0, (name, param)
            for rank in ranks:
                diff = (rank[name]["split_grad"][param] - want).abs().max().item()
                assert diff <= 1e-5 * max(scale, 1.0), f"{family} {name} {param}: {diff} (scale {scale})"


def test_a_refused_run_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    """The real entry point on 1 process with --sequence_parallel_size 2: one line, exit 2, no output folder."""
    from dpo.train import main
    from tests.builders import make_data_dir, make_model_dir, make_tokenizer

    tokenizer = make_tokenizer()
    model = make_model_dir(tmp_path / "model", tokenizer)
    data = make_data_dir(tmp_path / "data", tokenizer, n_train=8, n_eval=0)
    out = tmp_path / "out"
    capsys.readouterr()  # the builders' progress bars
    code = main(["--model_path", str(model), "--data_path", str(data), "--output_dir", str(out),
                 "--sequence_parallel_size", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "sequence_parallel_size 2 does not divide the 1 processes" in err[0], err


def _deepspeed_ulysses_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """DeepSpeed's own UlyssesSPAttentionHF on the same split rows (what accelerate's ParallelismConfig(sp_backend=
    "deepspeed") installs): it drops the mask, so packed and prompt-shared rows come out wrong."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    _join(rank, world)
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    from dpo import sequence_parallel as sp
    from dpo.distributed import deepspeed_all_to_all

    deepspeed_all_to_all()  # DeepSpeed's communication over the gloo group
    model = model_zoo.build("llama")
    spec = attention_spec(model.config)
    pairs = make_pairs(model.config.vocab_size)
    group = sp.setup(world)
    gaps = {}
    with torch.no_grad():
        whole = {}
        for layout in (PADDED, PACKED_SHARED):
            batch = make_collate(layout, pad_token_id=0, max_tokens_per_row=64, attention=spec)(pairs, None)
            whole[layout.name] = (batch, sequence_logps(model, batch))
        for layout, (batch, want) in whole.items():
            part = sp.shard(batch, group, spec)
            UlyssesSPAttentionHF.register_with_transformers(model, "sdpa", world, part.input_ids.shape[0])
            got = sequence_logps(model, part)
            gaps[layout] = float(max((got.chosen_logps - want.chosen_logps).abs().max(),
                                     (got.rejected_logps - want.rejected_logps).abs().max()))
            import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            mpu._release_sequence_parallel_groups()
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop("sdpa", None)
    torch.save(gaps, os.path.join(out_dir, f"ds{rank}.pt"))
    _leave()


@pytest.mark.distributed
def test_deepspeeds_own_ulysses_attention_drops_our_masks(tmp_path) -> None:
    """Why dpo/sequence_parallel.py wraps the model's attention itself: DeepSpeed 0.19's UlyssesSPAttentionHF sets
    every tensor attention mask to None and attends causally over the whole row. One right-padded sequence per row
    is then still right (causal is all it needs, padding comes last), but a row with several sequences or a shared
    prompt is not: the rejected branch sees the chosen one, packed sequences see each other."""
    mp.spawn(_deepspeed_ulysses_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    gaps = torch.load(tmp_path / "ds0.pt", weights_only=True)
    assert gaps[PADDED.name] < 1e-4, gaps
    assert gaps[PACKED_SHARED.name] > 0.1, gaps  # nats: the leak; our adapter is within 1e-5 (tests above)


@pytest.mark.distributed
def test_memory_benchmark_runs_the_same_pair_whole_and_split(tmp_path) -> None:
    """benchmarks/bench_sequence_parallel.py on a short pair, so the README's command cannot rot: both rows score
    the same pair to the same log-probs, each rank of N = 2 holds half the (padded) row."""
    from benchmarks.bench_sequence_parallel import main

    out = tmp_path / "sp.json"
    assert main(["--tokens", "256", "--layers", "1", "--json", str(out)]) == 0
    whole, split = json.loads(out.read_text())["rows"]
    assert (whole["size"], split["size"]) == (1, 2)
    assert split["local_tokens"] * 2 == whole["local_tokens"] + whole["local_tokens"] % 2
    assert abs(whole["chosen_logps"] - split["chosen_logps"]) <= 1e-4 * abs(whole["chosen_logps"])
    assert all(r["activation_mb"] > 0 and r["static_mb"] > 0 for r in (whole, split))


def _split_check_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """`dpo.layouts.check_split_rows` on a model the split serves (Llama) and one it does not (GPT-OSS: per-head
    attention sinks, a parameter of all H heads, meet the H/N heads of a rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    _join(rank, world)
    from dpo import sequence_parallel as sp
    from dpo.layouts import LayoutChoice, check_split_rows

    group = sp.setup(world)
    accelerator = types.SimpleNamespace(num_processes=world, device=torch.device("cpu"))
    cfg = types.SimpleNamespace(max_tokens_per_row=256, mixed_precision="no", attn_implementation="eager")
    outcome = {}
    for family in ("llama", "gpt_oss"):
        model = model_zoo.build(family)
        model.config._attn_implementation = "eager"
        spec = attention_spec(model.config)
        choice = LayoutChoice(layout=PACKED_SHARED, attention=spec, message="", mask_form="dense")
        try:
            outcome[family] = check_split_rows([model], choice, cfg, accelerator, group=group, pad_token_id=0)
        except UserError as error:
            outcome[family] = f"refused: {error}"
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS._local_mapping.pop("eager", None)  # a passing check leaves the split installed
    (Path(out_dir) / f"check{rank}.json").write_text(json.dumps(outcome))
    _leave()


@pytest.mark.distributed
def test_the_split_is_checked_on_the_model_before_training(tmp_path) -> None:
    mp.spawn(_split_check_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        outcome = json.loads((tmp_path / f"check{rank}.json").read_text())
        assert outcome["llama"].startswith("[dpo] sequence parallel: each row split across 2 processes (eager, 1 "
                                           "data-parallel groups; checked on the model against whole rows"), outcome
        assert outcome["gpt_oss"].startswith("refused: sequence_parallel_size 2: GptOssForCausalLM split across 2 "
                                             "processes gives"), outcome
        assert "\n" not in outcome["gpt_oss"]
