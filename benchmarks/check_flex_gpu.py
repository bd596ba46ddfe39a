"""FlexAttention on a GPU, checked against independent computations: compiled kernels, forward and backward.

    python -m benchmarks.check_flex_gpu [--families llama,gemma3_text] [--output bench_results/flex_gpu.json]

For each family of tests/model_zoo.py named (tiny random models, fp32, windows and chunks of 8 tokens that bite),
on CUDA: per-sequence log-probs of packed prefix-shared rows with FlexAttention block masks against the
per-sequence oracle (each prompt + answer run alone, float64 log-softmax), and the gradient of the summed log-probs
against the same rows on sdpa with dense masks. The CPU test suite covers the forward on every family
(tests/test_flex_attention.py); this adds what a CPU cannot run: the compiled GPU kernels and their backward.
Exit 1 when a family is off by more than 1e-4 nats (forward) or 1e-4 relative (gradient).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from model_zoo import build  # noqa: E402

from dpo.layouts import PACKED_SHARED, make_collate  # noqa: E402
from dpo.logprobs import sequence_logps  # noqa: E402
from dpo.masks import attention_spec  # noqa: E402

PAIRS = [{"prompt_ids": list(range(3, 3 + p)), "chosen_ids": list(range(40, 40 + c)),
          "rejected_ids": list(range(60, 60 + r))} for p, c, r in [(30, 6, 9), (17, 12, 4), (3, 5, 5), (9, 2, 14)]]


def oracle(model: torch.nn.Module) -> torch.Tensor:
    values = []
    for key in ("chosen_ids", "rejected_ids"):
        for pair in PAIRS:
            ids = torch.tensor([pair["prompt_ids"] + pair[key]], device="cuda")
            with torch.no_grad():
                logprobs = F.log_softmax(model(ids, use_cache=False).logits[0].double(), dim=-1)
            start = len(pair["prompt_ids"])
            values.append(sum(logprobs[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1])))
    return torch.tensor(values, dtype=torch.float64)


def layout_logps_and_grad(model: torch.nn.Module, form: str) -> tuple[torch.Tensor, torch.Tensor]:
    collate = make_collate(PACKED_SHARED, pad_token_id=0, max_tokens_per_row=40,
                           attention=attention_spec(model.config), mask_form=form)
    model.zero_grad(set_to_none=True)
    out = sequence_logps(model, collate(PAIRS, None).to("cuda"))
    values = torch.cat([out.chosen_logps, out.rejected_logps])
    values.sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return values.detach().double().cpu(), grad.detach().double().cpu()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.check_flex_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="llama,gemma3_text", help="comma-separated tests/model_zoo.py names")
    parser.add_argument("--output", default="bench_results/flex_gpu.json", help="JSON results")
    args = parser.parse_args(argv)
    results, ok = [], True
    for name in args.families.split(","):
        started = time.perf_counter()
        dense_model = build(name, head_dim=16).cuda().train()  # GPU FlexAttention kernels need head_dim >= 16
        flex_model = copy.deepcopy(dense_model)
        flex_model.set_attn_implementation("flex_attention")
        reference = oracle(dense_model.eval())
        dense_model.train()
        dense, dense_grad = layout_logps_and_grad(dense_model, "dense")
        flex, flex_grad = layout_logps_and_grad(flex_model, "block")
        row = {"family": name, "dense_vs_oracle_nats": float((dense - reference).abs().max()),
               "flex_vs_oracle_nats": float((flex - reference).abs().max()),
               "flex_vs_dense_grad_rel": float((flex_grad - dense_grad).norm() / dense_grad.norm()),
               "seconds": time.perf_counter() - started}
        row["exact"] = row["flex_vs_oracle_nats"] <= 1e-4 and row["flex_vs_dense_grad_rel"] <= 1e-4
        ok &= row["exact"]
        results.append(row)
        print(f"[check_flex_gpu] {json.dumps(row)}", flush=True)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                                             "rows": results}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
