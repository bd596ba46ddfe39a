"""Step metrics under fixed names (as TRL names them), kept on the device and reduced once per optimizer step, and
the writers: metrics.jsonl, TensorBoard, optional wandb. Only the main process writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from dpo.atomic import write_text_atomic
from dpo.listwise import finish_ranking_metrics

# Per-pair quantities summed (weighted) over the pairs of a step; their means are logged under these names.
PAIR_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logps/accuracies",
    "logratio/chosen",
)


class MetricAccumulator:
    """Weighted sums of PAIR_METRICS over micro-batches, plus pair and token counts, as one device tensor.

    Per-pair values under other names (the components of a loss mix, `loss/<name>`) are accumulated too, in the
    order they first appear (the same on every process: it follows the config)."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.extra_names: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(PAIR_METRICS) + 2, dtype=torch.float64, device=self.device)
        self.extra_sums = torch.zeros(len(self.extra_names), dtype=torch.float64, device=self.device)
        self.absent: set[str] = set()  # not measurable in this run (logratio/chosen without a reference): not logged

    def add(self, values: dict[str, torch.Tensor | None], weight: torch.Tensor, num_tokens: int) -> None:
        """`values[name]` is a [B] tensor of per-pair values (None for logratio/chosen without a reference)."""
        weight = weight.detach().to(self.sums.device, torch.float64)
        parts = []
        for name in PAIR_METRICS:
            v = values.get(name)
            if v is None:
                self.absent.add(name)
            parts.append(torch.zeros((), dtype=torch.float64, device=self.sums.device) if v is None
                         else (v.detach().to(torch.float64) * weight).sum())
        parts.append(weight.sum())
        parts.append(torch.tensor(float(num_tokens), dtype=torch.float64, device=self.sums.device))
        self.sums += torch.stack(parts)
        extra = [name for name in values if name not in PAIR_METRICS and values[name] is not None]
        for name in extra:
            if name not in self.extra_names:
                self.extra_names.append(name)
                self.extra_sums = torch.cat([self.extra_sums, self.extra_sums.new_zeros(1)])
        for name in extra:
            v = values[name]
            assert v is not None
            self.extra_sums[self.extra_names.index(name)] += (v.detach().to(torch.float64) * weight).sum()

    def reduce(self, accelerator: Any) -> dict[str, float]:
        """Sum over processes (one collective), then one transfer to the host; means per pair."""
        both = torch.cat([self.sums, self.extra_sums])
        totals = accelerator.reduce(both, reduction="sum") if accelerator.num_processes > 1 else both
        values = totals.tolist()
        pairs, tokens = values[len(PAIR_METRICS)], values[len(PAIR_METRICS) + 1]
        out = {name: (values[i] / pairs if pairs else math.nan) for i, name in enumerate(PAIR_METRICS)
               if name not in self.absent}
        for i, name in enumerate(self.extra_names):
            out[name] = values[len(PAIR_METRICS) + 2 + i] / pairs if pairs else math.nan
        out["num_pairs"] = pairs
        out["num_tokens"] = tokens
        self.reset()
        return finish_ranking_metrics(out)  # ranked runs: ratios of the accumulated counts (dpo.listwise)


def pair_values(
    *, losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
    policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor | None,
) -> dict[str, torch.Tensor | None]:
    """Per-pair values of PAIR_METRICS. logps/accuracies is 1 where the policy gives the chosen answer the higher
    log-prob (as the loss sees them: summed, or per-token means for average_log_prob and SimPO), the preference
    accuracy of the model itself, with no reference: unlike rewards/accuracies it is informative at step 0.
    logratio/chosen is log π(chosen) − log π_ref(chosen), the policy's drift
    from the reference on the chosen answer (rewards/chosen / β for the DPO losses; not a KL divergence, which
    would need samples from the policy, and negative whenever the chosen answer lost probability); None when the
    loss has no reference."""
    return {
        "loss": losses,
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        "logps/chosen": policy_chosen_logps,
        "logps/rejected": policy_rejected_logps,
        "logps/accuracies": (policy_chosen_logps > policy_rejected_logps).to(policy_chosen_logps.dtype),
        "logratio/chosen": None if ref_chosen_logps is None else policy_chosen_logps - ref_chosen_logps,
    }


class MetricsWriter:
    """metrics.jsonl (one object per logged step or evaluation), TensorBoard under tensorboard/, and wandb."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, use_wandb: bool = False,
                 run_name: str | None = None, wandb_project: str = "dpo-pipeline",
                 config: dict[str, Any] | None = None) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        if use_wandb:
            try:
                import wandb
            except ImportError as exc:
                raise RuntimeError("use_wandb: the wandb package is not installed; pip install -e '.[wandb]' from "
                                   "the clone (or pip install wandb), or drop --use_wandb") from exc
            self.wandb = wandb
            wandb.init(project=wandb_project, name=run_name, config=config or {})

    def truncate_after(self, step: int) -> None:
        """On resume, drop records written after the checkpoint's step, so the file reads like one clean run."""
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **metrics}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tb.add_scalar(f"{split}/{name}", value, step)
        self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
