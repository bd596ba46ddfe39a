"""The layout probe cannot be fooled: lengths from the data, single sequences as the reference, train mode checked.

Each test uses real tiny transformers models (tests/model_zoo.py, tests/family_walk.py) and an oracle independent of
the probe: each prompt + answer run alone in float64 (tests/test_architectures.py's `oracle_logps`).
"""

from __future__ import annotations

import pytest
import torch
from family_walk import build_family
from model_zoo import build
from test_architectures import PAIRS, TOLERANCE, layout_logps, oracle_logps

from dpo.config import ConfigError, TrainConfig
from dpo.layouts import (
    PACKED,
    PACKED_SHARED,
    PADDED,
    SINGLE,
    LayoutError,
    choose_layout,
    make_collate,
    probe_layouts,
)
from dpo.logprobs import sequence_logps
from dpo.masks import AttentionSpec, MaskRule, attention_spec
from dpo.models import disable_dropout

CHOOSE = dict(layout="auto", prefix_sharing=None, pad_token_id=0, max_tokens_per_row=2048, precise=True)


def test_a_window_the_config_reader_misses_is_caught_within_the_data_s_lengths():
    """Mistral with a 64-token window, read as plain causal attention (what a window under an unread field looks
    like to the mask builder): with data of 100-token pairs the probe reaches the window and refuses the shared
    layouts, which the oracle confirms are off; with data of 40-token pairs the window never bites and they are
    exact for that data."""
    model = build("mistral_window")
    model.config.sliding_window = 64
    unread = AttentionSpec()
    long_pair = {"prompt_ids": list(range(3, 93)), "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9, 10, 11]}
    oracle = oracle_logps(model, [long_pair])
    collate = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=2048, attention=unread)
    with torch.no_grad():
        out = sequence_logps(model, collate([long_pair], None))
    assert float((torch.cat([out.chosen_logps, out.rejected_logps]).double() - oracle).abs().max()) > 100 * TOLERANCE
    far = probe_layouts(model, unread, [PACKED_SHARED], pad_token_id=0, max_tokens_per_row=2048, precise=True,
                        longest=100)[0]
    assert not far.exact and far.max_difference > 100 * TOLERANCE
    near = probe_layouts(model, unread, [PACKED_SHARED], pad_token_id=0, max_tokens_per_row=2048, precise=True,
                         longest=40)[0]
    assert near.exact


def test_no_batched_layout_exact_runs_one_sequence_per_forward_and_equals_the_oracle():
    """RoBERTa as a causal LM without `is_decoder` attends both ways: padding reaches the real tokens, so even the
    padded layout is off single sequences (the old probe's reference). The default is one sequence per forward,
    which equals the oracle; an explicit padded request is refused in one line naming the class and difference."""
    model = build_family("roberta")
    oracle = oracle_logps(model, PAIRS)
    assert float((layout_logps(model, PADDED, PAIRS) - oracle).abs().max()) > 100 * TOLERANCE
    choice = choose_layout([model], **CHOOSE)
    assert choice.layout == SINGLE
    assert "not padded: RobertaForCausalLM gives log-probs" in choice.message
    assert float((layout_logps(model, SINGLE, PAIRS) - oracle).abs().max()) <= TOLERANCE
    with pytest.raises(LayoutError) as refused:
        choose_layout([model], **{**CHOOSE, "layout": "padded"})
    assert "\n" not in str(refused.value) and "RobertaForCausalLM" in str(refused.value)
    assert "nats away from single sequences'" in str(refused.value) and "--layout single" in str(refused.value)


def test_single_layout_runs_each_sequence_alone_also_for_wpo_s_dense_head():
    model = build("llama")
    batch = make_collate(SINGLE, pad_token_id=0, max_tokens_per_row=2048)(PAIRS, None)
    assert batch.alone and batch.input_ids.shape[0] == 2 * len(PAIRS)
    with torch.no_grad():
        dense = sequence_logps(model, batch, with_log_sum_sq=True)
    oracle = oracle_logps(model, PAIRS)
    assert float((torch.cat([dense.chosen_logps, dense.rejected_logps]).double() - oracle).abs().max()) <= TOLERANCE
    assert dense.token_log_sum_sq is not None and dense.token_log_sum_sq.shape == dense.token_logps.shape
    assert bool((dense.token_log_sum_sq <= 0).all())  # log of a probability that two samples agree


def test_router_jitter_is_turned_off_by_disable_dropout():
    """Mixtral's router scales its input by uniform noise in train mode (`router_jitter_noise`): two train-mode
    forwards differ (negative control) until disable_dropout, after which train mode equals eval mode."""
    model = build("mixtral")
    ids = torch.tensor([PAIRS[0]["prompt_ids"]])
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    for module in model.modules():
        if hasattr(module, "jitter_noise"):
            module.jitter_noise = 0.5
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        disable_dropout(model)
        assert torch.equal(model(ids, use_cache=False).logits, expected)


def test_a_model_random_in_train_mode_is_refused_unless_allowed():
    """PhiMoE's router samples experts in train mode (not a dropout rate: nothing to switch off). The probe names it
    in one line; with allow_nondeterministic_train the run goes on and the log says so. In eval mode (a frozen
    reference, precompute_ref) it is deterministic and gets its layout."""
    model = build_family("phimoe")
    disable_dropout(model)
    model.train()
    with torch.no_grad():  # independent evidence: train-mode forwards of the same sequences differ
        torch.manual_seed(0)
        flips = 0
        for pair in PAIRS:
            ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
            first = model(ids, use_cache=False).logits
            flips += sum(not torch.equal(first, model(ids, use_cache=False).logits) for _ in range(4))
        assert flips > 0
    torch.manual_seed(0)  # the sampling is random; a fixed seed keeps this test's verdict fixed
    with pytest.raises(LayoutError) as refused:
        choose_layout([model], **CHOOSE)
    message = str(refused.value)
    assert "\n" not in message and "PhimoeForCausalLM is random in train mode" in message
    assert "allow_nondeterministic_train" in message
    allowed = choose_layout([model], **CHOOSE, allow_nondeterministic_train=True)
    assert "allowed by allow_nondeterministic_train" in allowed.message
    model.eval()
    assert "allow" not in choose_layout([model], **CHOOSE).message
    assert model.training is False  # the probe restores the mode it found


def test_the_probe_checks_train_mode_and_restores_the_mode():
    model = build("llama", dropout=True)
    disable_dropout(model)
    model.train()
    result = probe_layouts(model, attention_spec(model.config), [PACKED_SHARED], pad_token_id=0,
                           max_tokens_per_row=2048, precise=True, train=True)[0]
    assert result.exact and result.train_difference is not None and result.train_difference <= TOLERANCE
    assert model.training
    model.eval()
    probe_layouts(model, attention_spec(model.config), [PACKED], pad_token_id=0, max_tokens_per_row=2048,
                  precise=True)
    assert not model.training


def test_unknown_layer_types_are_probed_not_assumed():
    """Layer types in neither known list are neither refused up front nor trusted: the spec lists them as unknown,
    the probe decides, and the log line names them."""
    from dpo.layouts import static_reason

    nemotron = attention_spec(build_family("nemotron_h").config)
    assert set(nemotron.unknown_types) == {"mlp", "moe"} and nemotron.recurrent_types == ("linear_attention",)
    spec = AttentionSpec(rules=(("full_attention", MaskRule()), ("mlp_only", MaskRule())), unknown_types=("mlp_only",))
    assert static_reason(spec, PACKED_SHARED) is None
    assert "unknown layer types (probed): mlp_only" in spec.describe()


def test_layout_single_cannot_share_prompts():
    with pytest.raises(ConfigError, match="layout single"):
        TrainConfig(model_path="m", data_path="d", output_dir="o", layout="single", prefix_sharing=True).validate()
    TrainConfig(model_path="m", data_path="d", output_dir="o", layout="single").validate()


def test_lora_dropout_is_left_off_while_the_probe_looks():
    """LoRA's own dropout is the user's choice and applies in training; the probe's train-mode check must not take
    it for model randomness. With B drawn non-zero (a resumed adapter) dropout 0.5 would move every forward."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5,
                                                      target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.train()
    ids = torch.tensor([PAIRS[0]["prompt_ids"]])
    with torch.no_grad():  # negative control: the adapter's dropout is live in train mode
        assert not torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    choice = choose_layout([model], **CHOOSE)
    assert choice.layout == PACKED_SHARED and "random" not in choice.message
    assert model.training and all(m.training for n, m in model.named_modules() if "lora_dropout" in n)


def test_the_selection_watch_names_a_partial_top_k_over_the_row_only():
    """dpo.selection on hand-made calls: a top-k keeping 4 of a dimension as long as the row (6, then 9) is a
    selection among positions; a router's top-k over a fixed dimension (8 experts) and a top-k keeping every
    candidate are not."""
    from dpo.selection import SelectionWatch

    watch = SelectionWatch()
    with watch:
        for length in (6, 9):
            torch.randn(1, length, length).topk(4, dim=-1)
            torch.topk(torch.randn(length, 8), 2, dim=-1)
            torch.randn(1, length).topk(length, dim=-1)
    sites = watch.row_dependent()
    assert len(sites) == 1 and sites[0].startswith("test_probe.py:")
    assert len(watch.calls) == 3  # every call was seen; two were let through


def _padding_moves_a_sequence(model: torch.nn.Module) -> float:
    """The largest gap between a sequence run alone and the same sequence right-padded (2D mask) over lengths 20-40
    and paddings of 1-16, from the model's own forward: evidence independent of the probe and the layouts."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for length in range(20, 41):
            ids = torch.randint(3, model.config.vocab_size, (1, length), generator=generator)
            alone = model(ids, use_cache=False).logits[0].double().log_softmax(-1)
            for pad in (1, 4, 8, 16):
                padded = torch.cat([ids, torch.zeros(1, pad, dtype=ids.dtype)], dim=1)
                mask = torch.cat([torch.ones_like(ids), torch.zeros(1, pad, dtype=ids.dtype)], dim=1)
                out = model(padded, attention_mask=mask, use_cache=False).logits[0, :length].double().log_softmax(-1)
                worst = max(worst, float((out - alone).abs().max()))
    return worst


def test_a_top_k_among_the_row_s_positions_runs_one_sequence_per_forward():
    """DeepSeek V4's indexer keeps the top 4 compressed blocks per query (index_topk 4 in the tiny config). Its
    ReLU'd scores tie at 0, and the tie falls by position among candidates whose number grows with the row, so
    padding moves real tokens for some lengths and paddings only. The probe's pairs alone missed it (the test
    pairs' longest, 25 tokens); the probe now sees the top-k in the single-sequence forwards and uses one sequence
    per forward, and an explicit padded request is refused in one line with the class and the difference."""
    model = build_family("deepseek_v4")
    assert _padding_moves_a_sequence(model) > 100 * TOLERANCE
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in PAIRS)
    for data_longest in (longest, None):
        choice = choose_layout([model], **CHOOSE, longest=data_longest)
        assert choice.layout == SINGLE
        assert "not padded: DeepseekV4ForCausalLM picks keys by top-k among the positions of the row" in choice.message
        assert "modeling_deepseek_v4.py:" in choice.message
    assert float((layout_logps(model, SINGLE, PAIRS) - oracle_logps(model, PAIRS)).abs().max()) <= TOLERANCE
    with pytest.raises(LayoutError) as refused:
        choose_layout([model], **{**CHOOSE, "layout": "padded"}, longest=longest)
    message = str(refused.value)
    assert "\n" not in message and "DeepseekV4ForCausalLM" in message and "nats away from single sequences'" in message


def test_an_moe_router_s_top_k_is_not_a_selection_among_positions():
    """Negative control: Mixtral routes each token to 2 of 4 experts by top-k over a fixed dimension; padding
    cannot change that choice (independent check), and the probe keeps the fastest layout."""
    model = build("mixtral")
    assert _padding_moves_a_sequence(model) <= TOLERANCE
    assert choose_layout([model], **CHOOSE).layout == PACKED_SHARED


def test_a_model_that_computes_otherwise_in_train_mode_is_refused():
    """A deterministic train-only change (a layer that scales its output in train mode, what a train-only code
    path looks like from outside) is refused in one line: train mode must equal eval mode."""
    model = build("llama")
    layer = model.model.layers[0]
    layer.register_forward_hook(lambda module, args, out: out * 1.5 if module.training else out)
    model.train()
    ids = torch.tensor([PAIRS[0]["prompt_ids"]])
    with torch.no_grad():  # independent evidence: train mode moves the logits, repeatably
        train = model(ids, use_cache=False).logits
        assert torch.equal(train, model(ids, use_cache=False).logits)
        assert not torch.allclose(train, model.eval()(ids, use_cache=False).logits)
    model.train()
    with pytest.raises(LayoutError, match="LlamaForCausalLM computes otherwise in train mode"):
        choose_layout([model], **CHOOSE)
    allowed = choose_layout([model], **CHOOSE, allow_nondeterministic_train=True)
    assert allowed.layout == PACKED_SHARED and "checked in eval mode only" in allowed.message


def test_a_frozen_reference_twin_of_the_policy_is_not_probed_again():
    """A frozen copy of the policy's starting weights computes the policy's eval-mode forward, which the policy's
    probe checks: it is not run through the probe a second time (the start-up cost of a run with a frozen reference
    halves). A copy whose weights, buffers or dtype differ is probed."""
    import copy

    from dpo.layouts import same_forward

    policy = build("llama")
    twin = copy.deepcopy(policy)
    assert same_forward(policy, twin)
    moved = copy.deepcopy(policy)
    with torch.no_grad():
        next(moved.parameters())[0, 0] += 1e-3
    halved = copy.deepcopy(policy).to(torch.bfloat16)
    rope = copy.deepcopy(policy)
    buffer = next(b for _, b in rope.named_buffers())
    buffer.mul_(1.5)
    assert not any(same_forward(policy, other) for other in (moved, halved, rope))

    forwards = {"twin": 0, "moved": 0}
    for name, model in (("twin", twin), ("moved", moved)):
        model.register_forward_pre_hook(lambda *_, key=name: forwards.__setitem__(key, forwards[key] + 1))
    policy.train()
    alone = choose_layout([policy], **CHOOSE)
    with_twin = choose_layout([policy, twin.eval()], **CHOOSE)
    assert forwards["twin"] == 0 and with_twin.layout == alone.layout == PACKED_SHARED
    choose_layout([policy, moved.eval()], **CHOOSE)
    assert forwards["moved"] > 0


def test_bench_probe_counts_the_probe_s_forwards_and_the_frozen_twin_adds_none(monkeypatch):
    """benchmarks/bench_probe.py on a tiny version of the throughput benchmark's model: the probe's tokens are the
    data's longest sequence twice (alone, and in the candidate's row) plus the short pairs and train-mode checks;
    the frozen reference twin adds no forward."""
    import benchmarks.bench_probe as bench_probe
    from benchmarks.bench_throughput import model_shape

    monkeypatch.setattr(bench_probe, "MODEL_SHAPE", {**model_shape(hidden_size=64, num_layers=2, vocab_size=400),
                                                     "num_heads": 4})
    alone = bench_probe.measure("llama", 200, repeats=1)
    with_twin = bench_probe.measure("llama", 200, repeats=1, frozen_reference=True)
    assert alone["layout"] == with_twin["layout"] == PACKED_SHARED.name
    assert with_twin["tokens"] == alone["tokens"] and with_twin["forwards"] == alone["forwards"]
    assert 2 * 200 < alone["tokens"] < 2 * 200 + 1200 and alone["cpu_seconds"] >= 0
