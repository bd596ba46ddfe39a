"""Every batch layout computes the same function: per-example log-probs, DPO losses, policy gradients and a short
training trajectory of packed and prefix-shared batches equal the padded layout's, with and without LoRA, under each
reference strategy (frozen copy, adapters disabled, precomputed columns)."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerance import assert_reordered_close, model_terms

from builders import make_data_dir, make_model_dir, make_tokenizer
from demo.tiny import build_model
from dpo.config import TrainConfig, load_config
from dpo.data import PreferenceBatch, collate_padded
from dpo.layouts import make_collate
from dpo.logprobs import sequence_logps
from dpo.metrics import PAIR_METRICS, read_metrics
from dpo.prefix_sharing import collate_prefix_shared, shared_length
from dpo.reference import Reference, make_reference
from dpo.train import forward_and_loss, train

VOCAB = 64
# (layout, prefix_sharing, max_tokens_per_row): small bounds force several rows and a pair alone in a row.
LAYOUTS = {
    "packed": ("packed", False, 48),
    "shared_packed": ("packed", True, 48),
    "shared_wide_bound": ("packed", True, 4096),  # rows then stop at the longest pair
    "shared_unpacked": ("padded", True, 48),
}


def make_pairs(seed: int = 0) -> list[dict[str, list[int]]]:
    """Varied lengths: a 1-token chosen and a 1-token rejected answer, a 1-token prompt, a long prompt."""
    rng = random.Random(seed)
    shapes = [(6, 1, 4), (41, 5, 3), (1, 3, 2), (9, 12, 1), (3, 2, 7), (17, 4, 4)]

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    return [{"prompt_ids": [1] + ids(p - 1), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in shapes]


def collate(pairs: list[dict], name: str, weights: list[float] | None = None) -> PreferenceBatch:
    if name == "padded":
        return collate_padded(pairs, pad_token_id=0, weights=weights)
    layout, prefix_sharing, bound = LAYOUTS[name]
    return make_collate(layout, pad_token_id=0, max_tokens_per_row=bound, prefix_sharing=prefix_sharing)(
        pairs, weights)


def naive_logps(model: torch.nn.Module, prompt: list[int], answer: list[int]) -> float:
    """One unpadded sequence alone, full log_softmax in float64: the independent oracle."""
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
    return sum(logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt), ids.shape[1]))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3)


@pytest.fixture(scope="module")
def lora_model() -> torch.nn.Module:
    """A LoRA-wrapped copy whose adapters are non-zero (peft starts B at zero, which would hide a wrong mask)."""
    from peft import LoraConfig, get_peft_model

    base = build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return peft_model


# ------------------------------------------------------------------------------------------ the collate itself


def test_collate_prefix_shared_hand_worked():
    """The docstring example of collate_prefix_shared, tensor by tensor."""
    pair = {"prompt_ids": [5, 6], "chosen_ids": [7, 2], "rejected_ids": [8, 9, 2]}
    batch = collate_prefix_shared([pair], pad_token_id=0, max_tokens_per_row=64)
    assert batch.input_ids.tolist() == [[5, 6, 7, 2, 6, 8, 9, 2]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 1, 2, 3, 4]]
    assert batch.target_ids.tolist() == [[0, 7, 2, 0, 8, 9, 2, 0]]
    assert batch.target_seq.tolist() == [[-1, 0, 0, -1, 1, 1, 1, -1]]
    allowed = {  # query -> keys it sees
        0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3],
        4: [0, 4], 5: [0, 4, 5], 6: [0, 4, 5, 6], 7: [0, 4, 5, 6, 7],
    }
    expected = torch.full((8, 8), float("-inf"))
    for q, keys in allowed.items():
        expected[q, keys] = 0.0
    assert batch.attention_mask.shape == (1, 1, 8, 8) and batch.attention_mask.dtype == torch.float32
    assert torch.equal(batch.attention_mask[0, 0], expected)
    assert batch.num_tokens == 2 * 2 + 2 + 3 and batch.pair_weight.tolist() == [1.0]


def test_collate_prefix_shared_packs_rows_and_isolates_pairs():
    pairs = make_pairs()
    batch = collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=48)
    lengths = [shared_length(p) for p in pairs]
    # Every pair's tokens appear once; rows respect the bound unless a pair alone is longer (the 51-token pair).
    assert int((batch.input_ids != 0).sum()) == sum(lengths)  # no token id is 0 in make_pairs
    real_per_row = (batch.input_ids != 0).sum(dim=1).tolist()
    assert all(n <= 48 or n in lengths for n in real_per_row) and max(lengths) > 48
    # Each sequence is scored on exactly its answer's tokens.
    counts = torch.bincount(batch.target_seq[batch.target_seq >= 0], minlength=2 * len(pairs)).tolist()
    assert counts == [len(p["chosen_ids"]) for p in pairs] + [len(p["rejected_ids"]) for p in pairs]
    # No query attends to another pair's token: keys a query sees all carry its own pair's scored sequences.
    allowed = batch.attention_mask[:, 0] == 0
    assert bool(allowed.diagonal(dim1=-2, dim2=-1).all())  # no empty softmax row, padding included
    assert set(batch.attention_mask.unique().tolist()) == {0.0, float("-inf")}


def test_collate_prefix_shared_rows_are_no_wider_than_the_longest_pair():
    pairs = make_pairs()
    batch = collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=4096)
    longest = max(shared_length(p) for p in pairs)
    assert batch.input_ids.shape[1] == longest  # the 51-token pair fills a row alone
    assert (batch.input_ids != 0).sum().item() == sum(shared_length(p) for p in pairs)
    # first-fit decreasing fills the remaining rows: fewer rows than pairs, so less padding than unpacked
    assert batch.input_ids.shape[0] < len(pairs)


def test_collate_prefix_shared_unpacked_is_one_pair_per_row():
    pairs = make_pairs()
    batch = collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=48, packed=False)
    assert batch.input_ids.shape == (len(pairs), max(shared_length(p) for p in pairs))
    assert (batch.input_ids != 0).sum(dim=1).tolist() == [shared_length(p) for p in pairs]


def test_collate_prefix_shared_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="empty prompt"):
        collate_prefix_shared([{"prompt_ids": [], "chosen_ids": [3], "rejected_ids": [4]}], pad_token_id=0,
                              max_tokens_per_row=8)


@pytest.mark.parametrize("name", ["padded", *LAYOUTS])
def test_useful_tokens_and_weights_do_not_depend_on_layout(name):
    pairs = make_pairs()
    weights = [1.0] * (len(pairs) - 1) + [0.0]
    batch = collate(pairs, name, weights)
    assert batch.num_tokens == sum(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                   for p in pairs[:-1])
    assert batch.pair_weight.tolist() == weights and batch.num_pairs == len(pairs)


# ------------------------------------------------------------------------------------------------ log-probs


@pytest.mark.parametrize("name", ["padded", *LAYOUTS])
def test_logps_equal_naive_per_sequence_recomputation(model, name):
    pairs = make_pairs()
    with torch.no_grad():
        out = sequence_logps(model, collate(pairs, name))
    expected_chosen = [naive_logps(model, p["prompt_ids"], p["chosen_ids"]) for p in pairs]
    expected_rejected = [naive_logps(model, p["prompt_ids"], p["rejected_ids"]) for p in pairs]
    terms = padded_terms(model, pairs)
    assert_reordered_close(out.chosen_logps, torch.tensor(expected_chosen), terms=terms, msg="chosen")
    assert_reordered_close(out.rejected_logps, torch.tensor(expected_rejected), terms=terms, msg="rejected")
    assert out.chosen_lengths.tolist() == [len(p["chosen_ids"]) for p in pairs]


def padded_terms(model: torch.nn.Module, pairs: list[dict]) -> int:
    """The sums a per-sequence log-prob goes through (tests/tolerance.py), at the padded layout's sizes; the other
    layouts sum the same terms in another order."""
    batch = collate_padded(pairs, pad_token_id=0)
    return model_terms(model.config, positions=batch.input_ids.numel(), row_length=batch.input_ids.shape[-1])


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_logps_equal_padded_layout(model, name, average):
    pairs = make_pairs()
    with torch.no_grad():
        padded = sequence_logps(model, collate(pairs, "padded"), average=average)
        other = sequence_logps(model, collate(pairs, name), average=average, chunk_size=7)
    terms = padded_terms(model, pairs)
    for field in ("chosen_logps", "rejected_logps", "chosen_nll"):
        assert_reordered_close(getattr(other, field), getattr(padded, field), terms=terms, msg=field)
    for field in ("chosen_lengths", "rejected_lengths"):
        assert torch.equal(getattr(other, field), getattr(padded, field))


@settings(max_examples=8, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 8), st.integers(1, 8)), min_size=1,
                       max_size=5),
       bound=st.integers(8, 64))
def test_logps_equal_padded_layout_for_any_lengths(shapes, bound):
    model = build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=3)
    rng = random.Random(len(shapes) * 100 + bound)
    pairs = [{"prompt_ids": [rng.randrange(3, VOCAB) for _ in range(p)],
              "chosen_ids": [rng.randrange(3, VOCAB) for _ in range(c)],
              "rejected_ids": [rng.randrange(3, VOCAB) for _ in range(r)]} for p, c, r in shapes]
    with torch.no_grad():
        padded = sequence_logps(model, collate_padded(pairs, pad_token_id=0))
        for packed in (True, False):
            shared = sequence_logps(model, collate_prefix_shared(pairs, pad_token_id=0, max_tokens_per_row=bound,
                                                                 packed=packed))
            terms = padded_terms(model, pairs)
            assert_reordered_close(shared.chosen_logps, padded.chosen_logps, terms=terms, msg="chosen")
            assert_reordered_close(shared.rejected_logps, padded.rejected_logps, terms=terms, msg="rejected")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lora_policy_and_adapters_disabled_reference_equal_padded(lora_model, name):
    pairs = make_pairs()
    cfg = TrainConfig(lora=True)
    reference = make_reference("adapters_disabled", cfg, policy=lora_model)
    results = {}
    for layout in ("padded", name):
        batch = collate(pairs, layout)
        with torch.no_grad():
            policy = sequence_logps(lora_model, batch)
        ref_chosen, ref_rejected = reference.logps(batch)
        results[layout] = (policy.chosen_logps, policy.rejected_logps, ref_chosen, ref_rejected)
    terms = padded_terms(lora_model, pairs)
    for got, want in zip(results[name], results["padded"]):
        assert_reordered_close(got, want, terms=terms, msg=name)
    # The adapters matter (so a mask that mixed them up would show): policy and reference differ.
    assert (results["padded"][0] - results["padded"][2]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------- losses and gradients


def reference_for(kind: str, model: torch.nn.Module, cfg: TrainConfig) -> Reference:
    if kind == "model":
        frozen = build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=4).requires_grad_(False)
        return make_reference("model", cfg, model=frozen)
    return make_reference(kind, cfg, policy=model)


def with_precomputed_columns(pairs: list[dict], model: torch.nn.Module) -> list[dict]:
    """Reference columns as `precompute_ref` stores them: per-pair sums computed once, here in the padded layout
    with an independent model (seed 4)."""
    with torch.no_grad():
        out = sequence_logps(model, collate_padded(pairs, pad_token_id=0))
    return [dict(p, ref_chosen_logps=float(c), ref_rejected_logps=float(r))
            for p, c, r in zip(pairs, out.chosen_logps, out.rejected_logps)]


def loss_and_grads(policy: torch.nn.Module, reference: Reference, batch: PreferenceBatch, cfg: TrainConfig
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    policy.zero_grad(set_to_none=True)
    out = forward_and_loss(policy, reference, batch, cfg)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    return out.loss.detach(), {k: v.detach() for k, v in out.pair_metrics.items() if v is not None}, grads


@pytest.mark.parametrize("kind", ["model", "precomputed", "adapters_disabled"])
@pytest.mark.parametrize("name", ["packed", "shared_packed", "shared_unpacked"])
def test_dpo_loss_metrics_and_policy_gradients_equal_padded(model, lora_model, kind, name):
    cfg = TrainConfig(lora=(kind == "adapters_disabled"), beta=0.5, rpo_alpha=0.3)
    policy = lora_model if kind == "adapters_disabled" else build_model(vocab_size=VOCAB, hidden_size=32,
                                                                        num_layers=2, seed=3)
    policy.train()
    reference = reference_for(kind, policy, cfg)
    pairs = make_pairs()
    if kind == "precomputed":
        pairs = with_precomputed_columns(pairs, build_model(vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=4))
    weights = [1.0] * (len(pairs) - 1) + [0.0]  # a weight-0 pair (the padding of an eval batch) counts nowhere
    loss_p, values_p, grads_p = loss_and_grads(policy, reference, collate(pairs, "padded", weights), cfg)
    loss_o, values_o, grads_o = loss_and_grads(policy, reference, collate(pairs, name, weights), cfg)
    assert float(loss_p) > 0 and grads_p
    terms = padded_terms(policy, pairs)
    # The loss and the per-pair values are functions of log-prob sums: their errors follow those sums' scale.
    logps_scale = max(float(v.abs().max()) for v in values_p.values())
    assert_reordered_close(loss_o, loss_p, terms=terms, scale=logps_scale, msg="loss")
    for key in values_p:
        assert_reordered_close(values_o[key], values_p[key], terms=terms, scale=logps_scale, msg=key)
    for param_name in grads_p:
        assert_reordered_close(grads_o[param_name], grads_p[param_name], terms=terms, msg=param_name)
    if kind == "precomputed":  # the columns travel with their pairs through any packing order
        batch = collate(pairs, name, weights)
        assert batch.ref_chosen_logps.tolist() == pytest.approx([p["ref_chosen_logps"] for p in pairs])


# ------------------------------------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout_train")
    tokenizer = make_tokenizer()
    return {"model": str(make_model_dir(root / "model", tokenizer, seed=0)),
            "other_model": str(make_model_dir(root / "other_model", tokenizer, seed=1)),
            "data": str(make_data_dir(root / "data", tokenizer, n_train=24, n_eval=6, seed=0))}


def run_training(inputs: dict, out, *flags: str) -> list[dict]:
    cfg = load_config(["--model_path", inputs["model"], "--data_path", inputs["data"], "--output_dir", str(out),
                       "--learning_rate", "1e-3", "--seed", "7", "--batch_size", "4", "--max_steps", "3",
                       "--max_tokens_per_row", "40", *flags])
    train(cfg)
    return read_metrics(out)


@pytest.mark.parametrize("reference", ["model", "adapters_disabled", "precomputed"])
def test_training_trajectory_is_the_same_for_every_layout(train_inputs, tmp_path, reference):
    inputs = dict(train_inputs)
    extra: tuple[str, ...] = ("--reference", reference)
    if reference == "adapters_disabled":
        extra += ("--lora", "--lora_dropout", "0", "--learning_rate", "5e-2")
    if reference == "precomputed":
        # The real precompute step, on a copy of the data, in the padded layout. The reference is another model:
        # were it the policy itself, step-1 rewards would be float noise around 0 and their signs (the accuracy)
        # would depend on summation order.
        from dpo.precompute_ref import main as precompute_main

        inputs["data"] = str(shutil.copytree(train_inputs["data"], tmp_path / "data"))
        extra += ("--ref_model_path", train_inputs["other_model"])
        assert precompute_main(["--model_path", inputs["model"], "--data_path", inputs["data"], "--layout", "padded",
                                "--ref_model_path", train_inputs["other_model"]]) == 0
    runs = {
        "padded": ("--layout", "padded", "--prefix_sharing", "false"),
        "packed": ("--layout", "packed", "--prefix_sharing", "false"),
        "shared_packed": ("--layout", "packed", "--prefix_sharing", "true"),
    }
    if reference == "model":
        runs["shared_unpacked"] = ("--layout", "padded", "--prefix_sharing", "true")
    records = {name: run_training(inputs, tmp_path / name, *flags, *extra) for name, flags in runs.items()}
    base = records.pop("padded")
    assert [r["step"] for r in base if r["split"] == "train"] == [1, 2, 3]
    assert base[-1]["loss"] != pytest.approx(base[0]["loss"], abs=1e-4)  # it trains, so the trajectory says something
    for name, other in records.items():
        assert [(r["step"], r["split"]) for r in other] == [(r["step"], r["split"]) for r in base]
        for ra, rb in zip(other, base):
            for key in PAIR_METRICS + (("grad_norm",) if ra["split"] == "train" else ()):
                assert ra[key] == pytest.approx(rb[key], abs=2e-5, rel=2e-5), (name, ra["step"], ra["split"], key)
