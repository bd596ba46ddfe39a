"""Every objective against TRL's DPOTrainer as the oracle (skipped without trl): on one tiny policy, one tiny
reference and the same token ids, our per-example loss and rewards at step 1 and our loss over a few SGD steps equal
TRL's, for each loss type, the documented weighted mix, WPO, LD-DPO and each f-divergence.

One TRL trainer serves the whole module: each case sets the trainer's objective attributes (what DPOConfig would
have set) and restores the policy's starting weights. Per-example values come from batches of one pair (TRL reports
batch means only); batch-coupled losses (aot, aot_unpaired, sft) are also compared on the whole batch, where only
the mean is defined. Trajectories: the same SGD steps on each side, each driven by its own loss, compared step by
step (TRL's `compute_loss` is the oracle's loss; the optimizer is shared so that only the objective is tested).

Tolerance, fp32: 1e-5 relative, with an absolute floor of 1e-6 x beta x the largest |summed log-prob| of the batch.
A reward beta * (log pi - log ref) is a small difference of two large sums (0.08 from two 17-nat sums here), which
TRL's fused LM head and ours each round in fp32 in a different order (1e-6 apart): no fp32 implementation can agree
to 1e-5 of the difference itself, only of the numbers it is made of. (float64 is no way out: TRL's fused head
computes in fp32 and then differs from a float64 forward by 0.02-0.1 nats.)"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
if not trl.__version__.startswith("1.16."):  # the definitions checked here are 1.16's (.ci/run pins it)
    pytest.skip(f"these checks are written against TRL 1.16, found {trl.__version__}", allow_module_level=True)

from builders import make_tokenizer  # noqa: E402
from demo.tiny import build_model  # noqa: E402
from dpo.config import TrainConfig  # noqa: E402
from dpo.layouts import make_collate  # noqa: E402
from dpo.reference import make_reference  # noqa: E402
from dpo.train import forward_and_loss  # noqa: E402

RECORDS = [  # varied lengths: LD-DPO's tail and WPO's means both have something to do
    {"prompt": "what is 3 plus 4?", "chosen": " the answer is 7.</s>", "rejected": " 9.</s>"},
    {"prompt": "what is 12 plus 20? what is 12 plus 20?", "chosen": " 32.</s>", "rejected": " the answer is 31.</s>"},
    {"prompt": "what is 1 plus 1?", "chosen": "</s>", "rejected": " 3.</s>"},
    {"prompt": "what is 29 plus 0?", "chosen": " 29 is the answer.</s>", "rejected": " 28.</s>"},
]
BETA = 0.5
RTOL = 1e-5
STEPS = 3
LR = 0.5
LR_FOR = {"sppo_hard": 0.01}  # its squared 1/beta-scaled targets make large gradients; 0.5 diverges in 3 steps

TRL_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
BATCH_COUPLED = {"aot", "aot_unpaired", "sft"}

# name -> our config fields; TRL's trainer gets the same values.
CASES = {name: {"loss_type": name} for name in TRL_LOSSES}
CASES["exo_pair"]["label_smoothing"] = 1e-3
CASES["robust"]["label_smoothing"] = 0.2
CASES["aot"]["label_smoothing"] = 0.1
CASES["discopop"]["discopop_tau"] = 0.05
CASES["mix_sigmoid_bco_sft"] = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
CASES["wpo_sigmoid"] = {"loss_type": "sigmoid", "use_weighting": True}
CASES["wpo_mix"] = {"loss_type": ["sigmoid", "bco_pair"], "loss_weights": [0.8, 0.2], "use_weighting": True}
CASES["ld_dpo"] = {"loss_type": "sigmoid", "ld_alpha": 0.3}
CASES["ld_dpo_zero"] = {"loss_type": "ipo", "ld_alpha": 0.0}
for div in ("forward_kl", "js_divergence", "alpha_divergence"):
    CASES[f"{div}_sigmoid"] = {"loss_type": "sigmoid", "f_divergence_type": div}
CASES["alpha_divergence_0.3_ipo"] = {"loss_type": "ipo", "f_divergence_type": "alpha_divergence",
                                     "f_alpha_divergence_coef": 0.3}
CASES["js_divergence_hinge"] = {"loss_type": "hinge", "f_divergence_type": "js_divergence"}


@pytest.fixture(autouse=True, scope="module")
def fresh_accelerate_state():
    """Accelerate's state is process-global: leave none behind for the next module's Accelerator."""
    from accelerate.state import AcceleratorState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_model(tokenizer, seed: int) -> torch.nn.Module:
    model = build_model(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, seed=seed,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    return model


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    import datasets

    tokenizer = make_tokenizer()
    policy, reference = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    # WPO's per-token normaliser is one of the fused head's outputs, chosen when the trainer is built: build it with
    # use_weighting on and switch the attribute per case.
    config = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), beta=BETA, max_length=None,
                           per_device_train_batch_size=len(RECORDS), use_cpu=True, report_to=[], disable_tqdm=True,
                           gradient_checkpointing=False, precompute_ref_log_probs=False, use_weighting=True,
                           bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=config,
                             train_dataset=datasets.Dataset.from_list(RECORDS), processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(len(RECORDS))]
    pairs = [{k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for row in rows]
    with torch.no_grad():
        logps = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(rows))
    return {"tokenizer": tokenizer, "trainer": trainer, "pairs": pairs, "rows": rows,
            "start": copy.deepcopy(trainer.model.state_dict()),
            "max_abs_logp": float(torch.cat(logps).abs().max())}


def set_trl_objective(trainer, fields: dict) -> None:
    """What DPOConfig + DPOTrainer.__init__ would have set for these fields."""
    names = fields["loss_type"] if isinstance(fields["loss_type"], list) else [fields["loss_type"]]
    trainer.loss_types = names
    trainer.loss_weights = fields.get("loss_weights") or [1.0] * len(names)
    trainer.label_smoothing = fields.get("label_smoothing", 0.0)
    trainer.args.discopop_tau = fields.get("discopop_tau", 0.05)
    trainer.f_divergence_type = fields.get("f_divergence_type", "reverse_kl")
    trainer.f_alpha_divergence_coef = fields.get("f_alpha_divergence_coef", 0.5)
    trainer.use_weighting = fields.get("use_weighting", False)
    trainer.ld_alpha = fields.get("ld_alpha")


def trl_loss(trainer, rows, *, grad: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    inputs = trainer.data_collator(rows)
    trainer.model.train()
    with torch.set_grad_enabled(grad):
        loss = trainer.compute_loss(trainer.model, inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss, metrics


def our_loss(model, reference, pairs, cfg, layout, prefix_sharing, pad):
    batch = make_collate(layout, pad_token_id=pad, max_tokens_per_row=64, prefix_sharing=prefix_sharing)(pairs, None)
    return forward_and_loss(model, reference, batch, cfg)


def close(ours: float, theirs: float, what: str, floor: float) -> None:
    assert ours == pytest.approx(theirs, rel=RTOL, abs=floor), f"{what}: ours {ours!r}, TRL {theirs!r}"


def run_case(trl_setup, name: str, layout: str = "packed", prefix_sharing: bool = True) -> None:
    fields = CASES[name]
    trainer, pairs, rows = trl_setup["trainer"], trl_setup["pairs"], trl_setup["rows"]
    pad = trl_setup["tokenizer"].pad_token_id
    set_trl_objective(trainer, fields)
    trainer.model.load_state_dict(trl_setup["start"])
    ours_model = tiny_model(trl_setup["tokenizer"], seed=0)
    ours_model.load_state_dict(trl_setup["start"])
    ours_model.train()
    cfg = TrainConfig(beta=BETA, **fields)
    reference = make_reference("model", cfg, model=trainer.ref_model)
    names = cfg.loss_types
    floor = 1e-6 * BETA * trl_setup["max_abs_logp"]

    # Step 1, per example (batches of one pair) and on the whole batch.
    with torch.no_grad():
        for i in range(len(pairs)):
            theirs, metrics = trl_loss(trainer, [rows[i]])
            ours = our_loss(ours_model, reference, [pairs[i]], cfg, layout, prefix_sharing, pad)
            close(float(ours.loss), float(theirs), f"{name} pair {i} loss", floor)
            for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
                close(float(ours.pair_metrics[key][0]), metrics[key], f"{name} pair {i} {key}", floor)
        theirs, metrics = trl_loss(trainer, rows)
        ours = our_loss(ours_model, reference, pairs, cfg, layout, prefix_sharing, pad)
        close(float(ours.loss), float(theirs), f"{name} batch loss", floor)
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                    "logps/rejected"):
            close(float(ours.pair_metrics[key].mean()), metrics[key], f"{name} batch {key}", floor)
        if len(names) > 1:  # the components add up to the total, by their weights
            total = sum(w * ours.pair_metrics[f"loss/{n}"] for n, w in zip(names, cfg.loss_weights))
            torch.testing.assert_close(total, ours.pair_metrics["loss"], rtol=1e-12, atol=1e-12)

    # A few SGD steps, each side on its own loss: the trajectories stay together.
    lr = LR_FOR.get(name, LR)
    trl_opt = torch.optim.SGD(trainer.model.parameters(), lr=lr)
    our_opt = torch.optim.SGD(ours_model.parameters(), lr=lr)
    losses = []
    for step in range(STEPS):
        theirs, _ = trl_loss(trainer, rows, grad=True)
        ours = our_loss(ours_model, reference, pairs, cfg, layout, prefix_sharing, pad)
        close(float(ours.loss), float(theirs), f"{name} step {step + 1} loss", floor)
        losses.append(float(theirs))
        for opt, loss in ((trl_opt, theirs), (our_opt, ours.loss)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert losses[0] != losses[-1], f"{name}: the steps did not move the loss, so the trajectory test is void"
    trainer.model.load_state_dict(trl_setup["start"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_equals_trl(trl_setup, name):
    run_case(trl_setup, name)


@pytest.mark.parametrize("layout,prefix_sharing", [("padded", False), ("packed", False)])
@pytest.mark.parametrize("name", ["ld_dpo", "wpo_sigmoid"])
def test_token_weighted_objectives_in_every_layout(trl_setup, name, layout, prefix_sharing):
    run_case(trl_setup, name, layout, prefix_sharing)
