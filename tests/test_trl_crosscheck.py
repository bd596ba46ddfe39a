"""Cross-check against TRL's DPOTrainer (skipped without trl): on the same tiny model, reference, tokens and batch,
our per-example log-probs, loss and reward metrics equal TRL's, in the padded, packed and prefix-shared layouts.

Tolerance: TRL 1.16 takes log-probs through its fused, tiled LM head, which lands up to ~3e-5 (relative) from a
float64 recomputation on this batch (5e-4 nats on a 17-nat sum); ours stays within 1e-6 of it (tests/test_layouts.py
checks ours against that oracle at 1e-5). So values are compared at 1e-4 relative, and ours must be the closer."""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
pytestmark = pytest.mark.slow  # importing TRL and running its trainer

from tolerance import assert_reordered_close, assert_scalars_reordered_close, batch_terms  # noqa: E402

from builders import make_tokenizer  # noqa: E402
from demo.tiny import build_model  # noqa: E402
from dpo.config import TrainConfig  # noqa: E402
from dpo.layouts import make_collate  # noqa: E402
from dpo.logprobs import sequence_logps  # noqa: E402
from dpo.reference import make_reference  # noqa: E402
from dpo.train import forward_and_loss  # noqa: E402

RECORDS = [  # text pairs; TRL tokenizes them, and its token ids become ours
    {"prompt": "what is 3 plus 4?", "chosen": " the answer is 7.</s>", "rejected": " 9.</s>"},
    {"prompt": "what is 12 plus 20? what is 12 plus 20?", "chosen": " 32.</s>", "rejected": " the answer is 31.</s>"},
    {"prompt": "what is 1 plus 1?", "chosen": "</s>", "rejected": " 3.</s>"},
    {"prompt": "what is 29 plus 0?", "chosen": " 29.</s>", "rejected": " 28.</s>"},
]
BETA = 0.25


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state():
    """Accelerate's state is process-global: leave none behind for the next module's Accelerator."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_model(tokenizer, seed: int) -> torch.nn.Module:
    return build_model(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=seed,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory):
    import datasets

    tokenizer = make_tokenizer()
    policy, reference = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    config = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, max_length=None,
                           per_device_train_batch_size=len(RECORDS), use_cpu=True, report_to=[], disable_tqdm=True,
                           gradient_checkpointing=False, precompute_ref_log_probs=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config,
                             train_dataset=datasets.Dataset.from_list(RECORDS), processing_class=tokenizer)
    pairs = [{k: trainer.train_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
             for i in range(len(RECORDS))]
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    trainer.model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, inputs)
        policy_chosen, policy_rejected = trainer.compute_ref_log_probs(trainer.model, inputs)
        ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return {"tokenizer": tokenizer, "policy": trainer.model, "reference": trainer.ref_model, "pairs": pairs,
            "loss": float(loss), "metrics": metrics, "policy_logps": (policy_chosen, policy_rejected),
            "ref_logps": (ref_chosen, ref_rejected)}


def test_trl_sees_varied_lengths(trl_run):
    """The batch exercises padding: answer lengths differ, one chosen answer is the EOS alone."""
    lengths = {len(p["chosen_ids"]) for p in trl_run["pairs"]} | {len(p["rejected_ids"]) for p in trl_run["pairs"]}
    assert 1 in lengths and len(lengths) >= 3


def padded_like_trl(trl_run) -> object:
    """Our padded batch of the same pairs: TRL's rows are as long (prompt + longest answer, padded)."""
    return make_collate("padded", pad_token_id=trl_run["tokenizer"].pad_token_id, max_tokens_per_row=4096)(
        trl_run["pairs"], None)


@pytest.mark.parametrize("layout,prefix_sharing", [("padded", False), ("packed", False), ("packed", True)])
def test_logps_loss_and_rewards_equal_trl(trl_run, layout, prefix_sharing):
    pad = trl_run["tokenizer"].pad_token_id
    batch = make_collate(layout, pad_token_id=pad, max_tokens_per_row=64, prefix_sharing=prefix_sharing)(
        trl_run["pairs"], None)
    cfg = TrainConfig(beta=BETA)
    reference = make_reference("model", cfg, model=trl_run["reference"])
    with torch.no_grad():
        ours = sequence_logps(trl_run["policy"], batch)
        ref_chosen, ref_rejected = reference.logps(batch)
        out = forward_and_loss(trl_run["policy"], reference, batch, cfg)
    trl_chosen, trl_rejected = trl_run["policy_logps"]
    # TRL's padded [chosen; rejected] batch and ours sum the same terms in another order (tests/tolerance.py).
    terms = max(batch_terms(trl_run["policy"], batch), batch_terms(trl_run["policy"], padded_like_trl(trl_run)))
    assert_reordered_close(ours.chosen_logps, trl_chosen, terms=terms, msg="policy chosen")
    assert_reordered_close(ours.rejected_logps, trl_rejected, terms=terms, msg="policy rejected")
    assert_reordered_close(ref_chosen, trl_run["ref_logps"][0], terms=terms, msg="reference chosen")
    assert_reordered_close(ref_rejected, trl_run["ref_logps"][1], terms=terms, msg="reference rejected")
    # The loss and rewards are functions of those sums: their errors follow the sums' scale.
    scale = float(torch.cat([trl_chosen, trl_rejected]).abs().max())
    assert_scalars_reordered_close(float(out.loss), trl_run["loss"], terms=terms, scale=BETA * scale, msg="loss")
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert_scalars_reordered_close(float(out.pair_metrics[key].mean()), trl_run["metrics"][key], terms=terms,
                                       scale=BETA * scale, msg=key)
    accuracy = float(out.pair_metrics["rewards/accuracies"].mean())  # a fraction of pairs: exact but for float32
    assert accuracy == pytest.approx(trl_run["metrics"]["rewards/accuracies"], abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):
        assert_scalars_reordered_close(float(out.pair_metrics[key].mean()), trl_run["metrics"][key], terms=terms,
                                       scale=scale, msg=key)
    assert trl_run["metrics"]["rewards/margins"] != pytest.approx(0.0, abs=1e-3)  # two different models


def test_ours_is_closer_than_trl_to_a_float64_recomputation(trl_run):
    import torch.nn.functional as F

    pad = trl_run["tokenizer"].pad_token_id
    batch = make_collate("packed", pad_token_id=pad, max_tokens_per_row=64, prefix_sharing=True)(trl_run["pairs"], None)
    model = trl_run["policy"]
    with torch.no_grad():
        ours = sequence_logps(model, batch).chosen_logps
        exact = []
        for pair in trl_run["pairs"]:
            ids = torch.tensor([pair["prompt_ids"] + pair["chosen_ids"]])
            logprobs = F.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
            exact.append(sum(logprobs[t - 1, ids[0, t]] for t in range(len(pair["prompt_ids"]), ids.shape[1])))
    exact = torch.stack(exact)
    ours_error = float((ours.double() - exact).abs().max())
    trl_error = float((trl_run["policy_logps"][0].double() - exact).abs().max())
    assert ours_error < 1e-5 and ours_error <= trl_error
