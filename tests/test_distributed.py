"""Distributed training on real DeepSpeed engines and DDP in 2 CPU processes (gloo), started with `accelerate launch`
exactly as users start them, each compared with one single-process run of the same global batch and seed.

    python -m pytest tests/test_distributed.py -m distributed

The oracle: with the same seed and global batch (1 process x batch 4 = 2 processes x batch 2 = 2 processes x batch 1
x accumulation 2), every strategy computes the same function, so the logged loss, rewards, log-probs, gradient norm
and learning rate of every step, the eval metrics, and the final weights agree with the single-process run up to the
float32 rounding of summing gradients in another order (measured: ~1e-7 relative; the tolerance is 1e-4).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo.data import eval_micro_batches, train_micro_batches
from tests.builders import make_data_dir, make_model_dir, make_tokenizer
from tests.tolerance import assert_reordered_close, model_terms

REPO = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 300
REL_TOL = 1e-4
# Rewards and the log-ratio are exactly 0 at step 1 (policy == reference) and margins pass through 0, where a relative
# tolerance means nothing; 1e-6 is ~10 float32 ulps of a summed log-prob of ~-25 times beta 0.1.
ABS_TOL = 1e-6
TRAIN_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
              "logps/rejected", "logratio/chosen", "num_pairs", "grad_norm", "learning_rate")
EVAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "logratio/chosen", "num_pairs")
# Five optimizer steps with a cosine schedule, an evaluation at steps 2, 4 and 5 (10 eval pairs: the last eval batch
# is partial on every layout), a checkpoint at step 3.
COMMON = ["--max_steps", "5", "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--seed", "7",
          "--eval_steps", "2", "--max_grad_norm", "1.0"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(config: str, module_args: list[str], *, num_processes: int, port: int,
               extra: list[str] | None = None, module: str = "dpo.train") -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{config}.yaml",
            "--num_processes", str(num_processes), "--main_process_port", str(port), *(extra or []),
            "-m", module, *module_args]


def launch_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def run_launch(cmd: list[str]) -> str:
    """Run one `accelerate launch` from the repository root (the configs' ds_configs paths are relative to it)."""
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {LAUNCH_TIMEOUT_S}s: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, \
        f"exit {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def read_records(output_dir: Path) -> dict[tuple[str, int], dict[str, float]]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {(r["split"], r["step"]): r for r in records}


def assert_same_trajectory(got: Path, want: Path, *, steps: range = range(1, 6), tol: float = REL_TOL) -> None:
    got_records, want_records = read_records(got), read_records(want)
    expected = [("train", s) for s in steps] + [("eval", s) for s in (2, 4, 5) if s in steps]
    assert sorted(got_records) == sorted(expected), f"logged records differ: {sorted(got_records)}"
    for key in expected:
        names = TRAIN_KEYS if key[0] == "train" else EVAL_KEYS
        for name in names:
            g, w = got_records[key][name], want_records[key][name]
            assert math.isfinite(g) and math.isclose(g, w, rel_tol=tol, abs_tol=ABS_TOL), \
                f"{key} {name}: {g} vs single-process {w}"


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert files, f"no safetensors in {folder}: {sorted(p.name for p in folder.iterdir())}"
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update(load_file(str(f)))
    return weights


def forward_terms(model: torch.nn.Module, batch) -> int:
    """tests/tolerance.py's sum lengths of a forward (no weight gradient) over `batch`'s rows."""
    return model_terms(model.config, positions=0, row_length=batch.input_ids.shape[-1])


def assert_close_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], *, atol: float) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype == torch.float32, name
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol, f"{name}: max |diff| {diff} > {atol}"


# ------------------------------------------------------------------------------------------- the split of data


def test_train_micro_batches_are_disjoint_and_cover_the_single_process_batches() -> None:
    """2 processes x batch 2 take exactly the pairs 1 process x batch 4 takes, each once, in the same steps."""
    for accumulation in (1, 2):
        single = train_micro_batches(22, batch_size=4, num_processes=1, process_index=0, accumulation=accumulation,
                                     seed=3, epoch=1)
        per_rank = [train_micro_batches(22, batch_size=2, num_processes=2, process_index=p,
                                        accumulation=accumulation, seed=3, epoch=1) for p in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == len(single)  # every rank runs every micro-step
        for m, batch in enumerate(single):
            assert per_rank[0][m] + per_rank[1][m] == batch
        seen = [i for rank in per_rank for b in rank for i in b]
        # Whole optimizer steps only (22 // 4 * 4 = 20, or 22 // 8 * 8 = 16): the tail is left out, nothing repeats.
        assert len(seen) == len(set(seen)) == 22 // (4 * accumulation) * 4 * accumulation
        assert set(seen) <= set(range(22))


def test_eval_micro_batches_cover_every_pair_once_with_weight_zero_padding() -> None:
    """10 pairs over 2 processes x batch 2: 3 global batches; the last one has pairs 8, 9 on rank 0 and two
    weight-0 fillers on rank 1."""
    per_rank = [eval_micro_batches(10, batch_size=2, num_processes=2, process_index=p) for p in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 3
    real = sorted(i for rank in per_rank for idx, w in rank for i, wi in zip(idx, w) if wi == 1.0)
    assert real == list(range(10))
    assert per_rank[0][2] == ([8, 9], [1.0, 1.0]) and per_rank[1][2] == ([0, 0], [0.0, 0.0])


# ------------------------------------------------------------------------------------------- the shipped configs

# Every shipped accelerate config and the test that launches it.
LAUNCHED_BY = {
    "single": "the single-process baseline",
    "ddp": "test_two_processes_reproduce_the_single_process_run[ddp]",
    "zero1": "test_two_processes_reproduce_the_single_process_run[zero1]",
    "zero2": "test_two_processes_reproduce_the_single_process_run[zero2]",
    "zero3": "test_two_processes_reproduce_the_single_process_run[zero3] and the ZeRO-3 tests",
    "zero3_offload": "test_two_processes_reproduce_the_single_process_run[zero3_offload]",
    "multi_node_zero3": "test_two_simulated_nodes_reproduce_the_single_process_run",
}


def test_every_shipped_config_is_launched_and_leaves_batch_settings_to_the_recipe() -> None:
    import yaml

    shipped = {p.stem: yaml.safe_load(p.read_text()) for p in (REPO / "accelerate_configs").glob("*.yaml")}
    assert sorted(shipped) == sorted(LAUNCHED_BY)
    used_json = set()
    for name, config in shipped.items():
        if config["distributed_type"] != "DEEPSPEED":
            continue
        json_path = REPO / config["deepspeed_config"]["deepspeed_config_file"]
        used_json.add(json_path.name)
        ds = json.loads(json_path.read_text())
        for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps",
                    "gradient_clipping"):
            assert ds[key] == "auto", (json_path.name, key)  # one place for each setting: the recipe
        assert ds["bf16"]["enabled"] == ds["fp16"]["enabled"] == "auto"
        if ds["zero_optimization"]["stage"] == 3:
            assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert used_json == {p.name for p in (REPO / "ds_configs").glob("*.json")}  # no JSON that nothing uses
    offload = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())["zero_optimization"]
    assert offload["offload_optimizer"]["device"] == offload["offload_param"]["device"] == "cpu"
    assert shipped["multi_node_zero3"]["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


# ------------------------------------------------------------------------------------------- shared runs


class Runs:
    """Lazily launched runs, shared by the tests of this module (each launch costs ~20 s on 2 cores)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tok = make_tokenizer()
        self.model = make_model_dir(root / "model", tok, seed=0)
        self.data = make_data_dir(root / "data", tok, n_train=32, n_eval=10, seed=0)
        self.cache: dict[str, Path] = {}

    def args(self, out: Path, *extra: str, data: Path | None = None) -> list[str]:
        return ["--model_path", str(self.model), "--data_path", str(data or self.data), "--output_dir", str(out),
                *COMMON, *extra]

    def train(self, name: str, config: str, *extra: str, num_processes: int = 2, batch_size: int = 2,
              data: Path | None = None) -> Path:
        if name not in self.cache:
            out = self.root / name
            log = run_launch(launch_cmd(config, self.args(out, "--batch_size", str(batch_size), *extra, data=data),
                                        num_processes=num_processes, port=free_port()))
            (self.root / f"{name}.log").write_text(log)
            self.cache[name] = out
        return self.cache[name]

    def single(self) -> Path:
        return self.train("single", "single", num_processes=1, batch_size=4)

    def precomputed_data(self) -> Path:
        """A copy of the data with reference log-probs from `dpo.precompute_ref` on 2 ZeRO-3 processes."""
        if "data_precomputed" not in self.cache:
            data = self.root / "data_precomputed"
            shutil.copytree(self.data, data)
            run_launch(launch_cmd("zero3", ["--model_path", str(self.model), "--data_path", str(data),
                                            "--batch_size", "2"],
                                  num_processes=2, port=free_port(), module="dpo.precompute_ref"))
            self.cache["data_precomputed"] = data
        return self.cache["data_precomputed"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


# ------------------------------------------------------------------------------------------- strategies


@pytest.mark.distributed
@pytest.mark.parametrize("config, extra", [
    ("ddp", ()),
    ("zero1", ("--batch_size", "1", "--gradient_accumulation_steps", "2")),  # DeepSpeed's own accumulation
    ("zero2", ()),
    ("zero3", ("--save_steps", "3")),  # the checkpoint and final/ tests below reuse this run
    # Offload also trains on the precomputed reference (one launch fewer): the single-process run computes its
    # reference on the fly, so this also proves the stored values are the reference's.
    ("zero3_offload", ("--reference", "precomputed")),
])
def test_two_processes_reproduce_the_single_process_run(runs: Runs, config: str, extra: tuple[str, ...]) -> None:
    if "precomputed" in extra and not (REPO / "dpo" / "precompute_ref.py").is_file():
        pytest.skip("dpo/precompute_ref.py is not in this tree")
    data = runs.precomputed_data() if "precomputed" in extra else None
    out = runs.train(config, config, *extra, data=data)
    assert_same_trajectory(out, runs.single())


@pytest.mark.distributed
def test_zero3_final_weights_equal_the_single_process_weights(runs: Runs) -> None:
    """final/ is gathered from the ZeRO-3 shards (stage3_gather_16bit_weights_on_model_save: the full weights in
    the training dtype, fp32 here) and loads with from_pretrained. Tolerance: 5 Adam steps of lr <= 1e-3 move a
    weight by at most ~5e-3; gradients summed in another order differ by ~1e-7 relative, and Adam's normalisation
    passes that on to at most ~1e-6 of the step size for all but near-zero gradients, so 1e-5 is 0.2% of the
    largest possible movement and far below it."""
    from transformers import AutoModelForCausalLM

    zero3 = runs.train("zero3", "zero3", "--save_steps", "3")
    single = load_weights(runs.single() / "final")
    got = load_weights(zero3 / "final")
    assert_close_weights(got, single, atol=1e-5)
    initial = load_weights(runs.model)
    moved = max((got[n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-4  # it trained: the comparison is not between two copies of the starting model
    model = AutoModelForCausalLM.from_pretrained(zero3 / "final", local_files_only=True, use_safetensors=True)
    loaded = {n: p.detach() for n, p in model.state_dict().items()}
    for name, value in got.items():
        assert torch.equal(loaded[name], value), name


@pytest.mark.distributed
def test_zero3_checkpoint_resumes_and_continues_identically(runs: Runs) -> None:
    """The uninterrupted ZeRO-3 run saved checkpoint-3; resuming it (same 2 processes) gives the same steps 4-5,
    the same evaluations and the same final weights."""
    zero3 = runs.train("zero3", "zero3", "--save_steps", "3")
    checkpoint = zero3 / "checkpoint-3"
    assert (checkpoint / "trainer_state.json").is_file()
    assert json.loads((checkpoint / "trainer_state.json").read_text())["step"] == 3
    resumed = runs.train("zero3_resumed", "zero3", "--resume_from_checkpoint", str(checkpoint))
    assert_same_trajectory(resumed, zero3, steps=range(4, 6), tol=1e-6)
    assert_close_weights(load_weights(resumed / "final"), load_weights(zero3 / "final"), atol=1e-7)


@pytest.mark.distributed
def test_zero3_lora_saves_only_an_adapter_that_reloads(runs: Runs) -> None:
    """LoRA (reference: adapters disabled) under ZeRO-3 matches single-process LoRA; final/ holds the adapter only,
    and it reloads onto the base with the trained values."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo.config import load_config
    from dpo.train import train

    lora = ("--lora", "--lora_dropout", "0", "--lora_r", "4", "--lora_alpha", "8")
    single = runs.root / "lora_single"
    train(load_config(runs.args(single, "--batch_size", "4", *lora)))  # in this process: one launch fewer
    zero3 = runs.train("lora_zero3", "zero3", *lora)
    assert_same_trajectory(zero3, single)
    # The layout probe ran through the sharded LoRA engine on both ranks and kept the fastest layout.
    assert "[dpo] layout: packed with prefix sharing on sdpa (checked" in (runs.root / "lora_zero3.log").read_text()
    final = zero3 / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    adapter = load_weights(final)
    assert adapter and all("lora_" in name for name in adapter), sorted(adapter)[:4]
    assert_close_weights(adapter, load_weights(single / "final"), atol=1e-5)
    assert max(v.abs().max().item() for n, v in adapter.items() if "lora_B" in n) > 1e-4  # B starts at 0: trained
    base = AutoModelForCausalLM.from_pretrained(runs.model, local_files_only=True, use_safetensors=True)
    reloaded = PeftModel.from_pretrained(base, str(final))
    state = reloaded.state_dict()
    for name, value in adapter.items():
        match = [k for k in state if k.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(state[match[0]], value), name


@pytest.mark.distributed
def test_two_simulated_nodes_reproduce_the_single_process_run(runs: Runs) -> None:
    """multi_node_zero3.yaml through `./launch.sh train` as examples/slurm_multi_node.sbatch starts it: one launcher
    per "node" (both on this machine, 1 process each), the multi-node settings in the environment."""
    out = runs.root / "two_nodes"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = launch_env()
        env.update(PYTHON=sys.executable, NUM_MACHINES="2", MACHINE_RANK=str(rank), MAIN_PROCESS_IP="127.0.0.1",
                   MAIN_PROCESS_PORT=port, NUM_PROCESSES="2")
        cmd = ["./launch.sh", "train", "--accelerate_config", "accelerate_configs/multi_node_zero3.yaml",
               *runs.args(out, "--batch_size", "2")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        outputs.append(f"timed out after {LAUNCH_TIMEOUT_S}s")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n\n".join(o[-6000:] for o in outputs)
    assert "global batch 4 = 2 per device x 1 accumulation x 2 processes" in outputs[0]
    assert_same_trajectory(out, runs.single())


def test_slurm_example_is_valid_bash_and_uses_the_multi_node_config() -> None:
    script = REPO / "examples" / "slurm_multi_node.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "accelerate_configs/multi_node_zero3.yaml" in text and "./launch.sh train" in text
    assert (REPO / "accelerate_configs" / "multi_node_zero3.yaml").is_file()


# ------------------------------------------------------------------------------------------- the reference


CHECK_REFERENCE = textwrap.dedent('''
    """Build the frozen reference under ZeRO-3 and report, per rank, how its parameters are held."""
    import json, sys
    import torch
    from dpo.config import load_config
    from dpo.data import eval_micro_batches, load_split
    from dpo.layouts import make_collate
    from dpo.distributed import build_accelerator
    from dpo.reference import build_reference

    cfg = load_config(sys.argv[1:])
    accelerator = build_accelerator(mixed_precision="no", gradient_accumulation_steps=1, max_grad_norm=1.0,
                                    batch_size=cfg.batch_size)
    reference = build_reference("model", cfg, accelerator)
    def held():
        return [[n, p.ds_numel, p.numel(), p.ds_tensor.numel()] for n, p in reference.model.module.named_parameters()]
    before = held()
    data = load_split(cfg.data_path, "eval")
    collate = make_collate("padded", pad_token_id=0, max_tokens_per_row=2048)
    logps = {}
    for indices, weights in eval_micro_batches(len(data), batch_size=2, num_processes=2,
                                               process_index=accelerator.process_index):
        batch = collate([data[i] for i in indices], weights)
        chosen, rejected = reference.logps(batch)
        for i, w, c, r in zip(indices, weights, chosen.tolist(), rejected.tolist()):
            if w:
                logps[i] = [c, r]
    with open(f"{cfg.output_dir}/rank{accelerator.process_index}.json", "w") as f:
        json.dump({"before": before, "after": held(), "logps": logps,
                   "is_engine": type(reference.model).__name__}, f)
''')


@pytest.mark.distributed
def test_zero3_frozen_reference_is_sharded_and_never_gathered_whole(runs: Runs) -> None:
    """Each rank holds half of every partitioned reference weight (ds_tensor), none whole (numel 0) before and after
    forwards, and the log-probs equal a plain single-process model's."""
    from dpo.data import collate_padded, load_split
    from dpo.logprobs import sequence_logps
    from dpo.models import load_causal_lm

    out = runs.root / "reference"
    out.mkdir()
    script = out / "check_reference.py"
    script.write_text(CHECK_REFERENCE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/zero3.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), str(script),
           "--model_path", str(runs.model), "--data_path", str(runs.data), "--output_dir", str(out),
           "--batch_size", "2"]
    run_launch(cmd)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    plain = load_causal_lm(str(runs.model))
    full = {n: p.numel() for n, p in plain.named_parameters()}
    threshold = 10 * 32  # stage3_param_persistence_threshold as dpo.distributed resolves "auto" (10 x hidden)
    for report in reports:
        assert report["is_engine"] == "DeepSpeedEngine"
        for when in ("before", "after"):
            for name, ds_numel, local_numel, shard_numel in report[when]:
                assert ds_numel == full[name], name
                if local_numel == 0 or ds_numel > threshold:  # partitioned: this rank holds only its half
                    assert local_numel == 0 and shard_numel == math.ceil(ds_numel / 2), (when, name)
        # Loaded partitioned (zero3_init_flag): nothing is whole before the first forward. After it, only the tiny
        # weights under the persistence threshold (the norms) stay resident, by design; every matrix is sharded.
        assert all(local == 0 for _, _, local, _ in report["before"])
        assert sum(local for _, _, local, _ in report["after"]) <= sum(n for n in full.values() if n <= threshold)
    data = load_split(runs.data, "eval")
    got = {int(i): v for report in reports for i, v in report["logps"].items()}
    assert sorted(got) == list(range(len(data)))
    with torch.no_grad():  # all pairs in one padded batch of a plain model: another batching, the same function
        padded = collate_padded(list(data), pad_token_id=0)
        want = sequence_logps(plain, padded)
    expected = torch.stack([want.chosen_logps, want.rejected_logps], dim=1)
    assert_reordered_close(torch.tensor([got[i] for i in range(len(data))]), expected,
                           terms=forward_terms(plain, padded))


@pytest.mark.distributed
def test_precompute_ref_on_two_zero3_processes_stores_every_pair_once(runs: Runs) -> None:
    """`python -m dpo.precompute_ref` under ZeRO-3 on 2 processes (the frozen reference sharded) writes every pair's
    reference log-probs exactly once, equal to a plain single-process model's; the zero3_offload case above trains
    on them."""
    from dpo.data import collate_padded, load_split
    from dpo.logprobs import sequence_logps
    from dpo.models import load_causal_lm

    if not (REPO / "dpo" / "precompute_ref.py").is_file():
        pytest.skip("dpo/precompute_ref.py is not in this tree")
    data = runs.precomputed_data()
    plain = load_causal_lm(str(runs.model))
    for split in ("train", "eval"):
        ds = load_split(data, split)
        assert ds["prompt_ids"] == load_split(runs.data, split)["prompt_ids"]  # same pairs, same order
        with torch.no_grad():  # all pairs in one padded batch of a plain model
            padded = collate_padded(list(ds), pad_token_id=0)
            want = sequence_logps(plain, padded)
        terms = forward_terms(plain, padded)
        assert_reordered_close(torch.tensor(ds["ref_chosen_logps"]), want.chosen_logps, terms=terms, msg=split)
        assert_reordered_close(torch.tensor(ds["ref_rejected_logps"]), want.rejected_logps, terms=terms, msg=split)
