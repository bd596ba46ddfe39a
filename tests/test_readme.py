"""Every command shown in README.md runs. The fenced ```bash blocks are extracted; each command must appear in
COVERAGE, which says which group runs it, and every group's commands are run here exactly as written except for
the substitutions of RUNNER_PATHS (tiny local inputs for the README's placeholder paths) and the reductions each
group states (fewer steps, 2 CPU processes instead of 8 or 16 GPUs, localhost for the cluster addresses). A README
command without an entry fails `test_every_readme_command_is_covered`; so does an entry the README dropped."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from builders import make_model_dir, make_tokenizer
from dpo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT_S = 600

# README command -> the group that runs it. "demo" is run by tests/test_demo.py::test_launch_demo_quick.
COVERAGE: dict[str, str] = {
    "./launch.sh demo": "demo",
    "./launch.sh test": "test",
    "./launch.sh prep --input data/my_prefs.jsonl --tokenizer path/to/sft_model --output data/prepped "
    "--eval_fraction 0.05 --max_length 1024 --max_prompt_length 512": "prep",
    "./launch.sh train --config recipes/full_small.yaml --model_path path/to/sft_model --data_path data/prepped "
    "--output_dir runs/my_dpo": "train",
    "python -m dpo.report runs/my_dpo": "train",
    "tensorboard --logdir runs/my_dpo/tensorboard": "train",
    "./launch.sh train --config recipes/lora.yaml --model_path path/to/sft_model --data_path data/prepped "
    "--output_dir runs/my_lora": "lora",
    "python -m dpo.precompute_ref --model_path path/to/sft_model --data_path data/prepped": "precomputed",
    "./launch.sh train --config recipes/full_small.yaml --model_path path/to/sft_model --data_path data/prepped "
    "--output_dir runs/my_precomputed --reference precomputed": "precomputed",
    "NUM_PROCESSES=8 ./launch.sh train --accelerate_config accelerate_configs/zero3.yaml --config "
    "recipes/full_small.yaml --model_path path/to/sft_model --data_path data/prepped --output_dir runs/zero3": "zero3",
    "NUM_MACHINES=2 NUM_PROCESSES=16 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 ./launch.sh "
    "train --accelerate_config accelerate_configs/multi_node_zero3.yaml --config recipes/full_small.yaml "
    "--model_path /shared/models/sft --data_path /shared/data/prepped --output_dir /shared/runs/dpo": "multi_node",
    "NUM_MACHINES=2 NUM_PROCESSES=16 MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 ./launch.sh "
    "train --accelerate_config accelerate_configs/multi_node_zero3.yaml --config recipes/full_small.yaml "
    "--model_path /shared/models/sft --data_path /shared/data/prepped --output_dir /shared/runs/dpo": "multi_node",
    "sbatch examples/slurm_multi_node.sbatch --config recipes/full_small.yaml --model_path /shared/models/sft "
    "--data_path /shared/data/prepped --output_dir /shared/runs/dpo": "slurm",
    "NUM_MACHINES=2 NUM_PROCESSES=16 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 ./launch.sh "
    "train --accelerate_config accelerate_configs/multi_node_zero3.yaml --config recipes/full_small.yaml "
    "--model_path /shared/models/sft --data_path /shared/data/prepped --output_dir /shared/runs/dpo_long "
    "--sequence_parallel_size 8": "sequence_parallel",
    "NUM_MACHINES=2 NUM_PROCESSES=16 MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 MAIN_PROCESS_PORT=29500 ./launch.sh "
    "train --accelerate_config accelerate_configs/multi_node_zero3.yaml --config recipes/full_small.yaml "
    "--model_path /shared/models/sft --data_path /shared/data/prepped --output_dir /shared/runs/dpo_long "
    "--sequence_parallel_size 8": "sequence_parallel",
    "python -m dpo.train --config recipes/full_small.yaml --model_path path/to/sft_model --data_path data/prepped "
    "--output_dir runs/my_mix --loss_type '[sigmoid, bco_pair, sft]' --loss_weights '[0.8, 0.2, 1.0]'": "objectives",
    "python -m dpo.train --config recipes/full_small.yaml --model_path path/to/sft_model --data_path data/prepped "
    "--output_dir runs/my_trdpo --reference model --sync_ref_model --ref_model_mixup_alpha 0.6 "
    "--ref_model_sync_steps 64": "objectives",
    "./launch.sh train --config config_full.yaml": "trl",
    "NUM_PROCESSES=8 ./launch.sh train --accelerate_config accelerate_configs/zero3.yaml --config config_full.yaml":
    "trl",
    "./launch.sh bench --vs-trl": "bench",
    "python -m benchmarks.bench_prep --pairs 20000 --json bench_results/bench_prep.json": "bench",
    "python -m data_prep --input data/my_ranked.jsonl --tokenizer path/to/sft_model --output data/ranked": "ranked",
    "python -m dpo.train --config recipes/full_small.yaml --model_path path/to/sft_model --data_path data/ranked "
    "--output_dir runs/my_listwise --listwise_loss plackett_luce": "ranked",
    "python -m benchmarks.bench_ranked --vs-trl --output bench_results/bench_ranked.json": "bench_ranked",
}
# Training commands, reduced: two optimizer steps of two pairs, no intermediate evaluation or checkpoint.
REDUCED_TRAINING = " --max_steps 2 --batch_size 2 --gradient_accumulation_steps 1 --eval_steps 0 --save_steps 0 " \
                   "--logging_steps 1 --seed 3"


def readme_commands(text: str) -> list[str]:
    """Commands of the ```bash blocks: backslash continuations joined, comments and blank lines dropped."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", "", block).splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def group_commands(group: str) -> list[str]:
    """The README's commands of one group, in README order, as written there."""
    commands = [c for c in readme_commands(README.read_text()) if COVERAGE.get(c) == group]
    assert commands, f"the README shows no command of group {group!r}"
    return commands


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """Tiny stand-ins for the README's paths: a 2-layer model, 40 raw preference records, output dirs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tokenizer = make_tokenizer()
        self.model = make_model_dir(root / "sft_model", tokenizer, seed=0)
        self.raw = root / "my_prefs.jsonl"
        rng = random.Random(0)
        records = []
        for _ in range(40):
            a, b = rng.randint(0, 29), rng.randint(0, 29)
            records.append({"prompt": f"what is {a} plus {b}?", "chosen": f" the answer is {a + b}.",
                            "rejected": f" the answer is {a + b + rng.choice([-2, -1, 1, 2])}."})
        self.raw.write_text("".join(json.dumps(r) + "\n" for r in records))
        self.ranked_raw = root / "my_ranked.jsonl"  # 4 scored answers per prompt (README "More than two answers")
        self.ranked_raw.write_text("".join(json.dumps({
            "prompt": r["prompt"], "responses": [r["chosen"], r["rejected"], " i do not know.", " 42."],
            "scores": [3, 1, 0, 0]}) + "\n" for r in records))
        self.prepped = root / "prepped"
        self.runs = root / "runs"

    def substitute(self, command: str, *, prepped: Path | None = None) -> str:
        """README placeholder paths -> this workspace's paths."""
        table = {"path/to/sft_model": self.model, "/shared/models/sft": self.model, "data/my_prefs.jsonl": self.raw,
                 "data/my_ranked.jsonl": self.ranked_raw, "data/ranked": self.root / "ranked",
                 "/shared/data/prepped": prepped or self.prepped, "data/prepped": prepped or self.prepped,
                 "/shared/runs/": f"{self.runs}/shared_", "runs/": f"{self.runs}/"}
        # One pass, longest placeholder first, so a substituted path is never substituted again.
        pattern = "|".join(re.escape(k) for k in sorted(table, key=len, reverse=True))
        return re.sub(rf"(?<![\w/])({pattern})", lambda m: str(table[m.group(1)]), command)

    def run(self, command: str, *, env: dict[str, str] | None = None, check: bool = True
            ) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-c", command], cwd=ROOT, env=run_env(env), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
        if check:
            assert done.returncode == 0, f"{command}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        return done


def run_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHON=sys.executable, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    ws = Workspace(tmp_path_factory.mktemp("readme"))
    (prep,) = group_commands("prep")
    ws.run(ws.substitute(prep))
    return ws


def assert_trained(out: Path, steps: int = 2) -> None:
    train_rows = [r for r in read_metrics(out) if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, steps + 1))
    assert (out / "final").is_dir()


# ------------------------------------------------------------------------------------------------ tests


def test_every_readme_command_is_covered():
    commands = readme_commands(README.read_text())
    uncovered = [c for c in commands if c not in COVERAGE]
    assert not uncovered, "README commands that no test runs (add them to COVERAGE):\n" + "\n".join(uncovered)
    stale = [c for c in COVERAGE if c not in commands]
    assert not stale, "COVERAGE entries no longer in the README:\n" + "\n".join(stale)


def test_substitution(tmp_path):
    ws = Workspace.__new__(Workspace)
    ws.model, ws.raw, ws.prepped, ws.runs = tmp_path / "m", tmp_path / "r.jsonl", tmp_path / "p", tmp_path / "runs"
    ws.root, ws.ranked_raw = tmp_path, tmp_path / "k.jsonl"
    assert ws.substitute("x --model_path path/to/sft_model --data_path data/prepped --output_dir runs/a") == \
        f"x --model_path {tmp_path}/m --data_path {tmp_path}/p --output_dir {tmp_path}/runs/a"
    assert ws.substitute("--output_dir /shared/runs/dpo --data_path /shared/data/prepped") == \
        f"--output_dir {tmp_path}/runs/shared_dpo --data_path {tmp_path}/p"
    assert ws.substitute("--input data/my_ranked.jsonl --output data/ranked") == \
        f"--input {tmp_path}/k.jsonl --output {tmp_path}/ranked"
    assert ws.substitute("recipes/full_small.yaml accelerate_configs/zero3.yaml") == \
        "recipes/full_small.yaml accelerate_configs/zero3.yaml"


def test_readme_commands_extraction():
    text = "x\n```bash\n# a comment\nA=1 run \\\n    --flag  x\n\nsecond\n```\n```json\n{\"no\": 1}\n```\n"
    assert readme_commands(text) == ["A=1 run --flag x", "second"]


def test_demo_command_runs_in_tests_test_demo():
    """`./launch.sh demo` is run, reduced with --quick, by tests/test_demo.py (the full demo takes minutes)."""
    assert group_commands("demo") == ["./launch.sh demo"]
    source = (ROOT / "tests" / "test_demo.py").read_text()
    assert 'def test_launch_demo_quick' in source and '["./launch.sh", "demo", "--quick"' in source


@pytest.mark.slow  # README commands end to end
def test_launch_sh_test(workspace):
    """Reduced: lint everything as `./launch.sh test` does, then one small test file instead of the whole suite."""
    (command,) = group_commands("test")
    done = workspace.run(command + " tests/test_losses.py -q -x")
    assert " passed" in done.stdout


@pytest.mark.slow  # README commands end to end
def test_prep(workspace):
    report = json.loads((workspace.prepped / "prep_report.json").read_text())
    assert report["records_read"] == 40
    assert report["pairs_written"]["train"] + report["pairs_written"]["eval"] == 40
    assert report["pairs_written"]["eval"] == 2  # 5% of 40
    assert report["max_length"] == 1024 and report["max_prompt_length"] == 512


@pytest.mark.slow  # README commands end to end
def test_train_report_and_tensorboard(workspace):
    train_cmd, report_cmd, tensorboard_cmd = group_commands("train")
    workspace.run(workspace.substitute(train_cmd) + REDUCED_TRAINING)
    out = workspace.runs / "my_dpo"
    assert_trained(out)
    workspace.run(workspace.substitute(report_cmd))
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Reduced: --inspect lists the logged scalars and exits instead of serving them.
    done = workspace.run(workspace.substitute(tensorboard_cmd) + " --inspect")
    assert "train/loss" in done.stdout and "eval/rewards/accuracies" in done.stdout


def test_objectives(workspace):
    """The weighted mix logs its components; TR-DPO is reduced to a sync every step (2 steps instead of 64)."""
    mix_cmd, trdpo_cmd = group_commands("objectives")
    workspace.run(workspace.substitute(mix_cmd) + REDUCED_TRAINING)
    out = workspace.runs / "my_mix"
    assert_trained(out)
    assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(read_metrics(out)[0])
    done = workspace.run(workspace.substitute(trdpo_cmd) + REDUCED_TRAINING + " --ref_model_sync_steps 1")
    assert_trained(workspace.runs / "my_trdpo")
    assert "reference: model" in done.stdout + done.stderr


@pytest.mark.slow  # README commands end to end
def test_lora(workspace):
    (command,) = group_commands("lora")
    done = workspace.run(workspace.substitute(command) + REDUCED_TRAINING)
    out = workspace.runs / "my_lora"
    assert_trained(out)
    assert "reference: adapters_disabled" in done.stdout + done.stderr
    assert (out / "final" / "adapter_config.json").is_file() and (out / "final_merged").is_dir()


@pytest.mark.slow  # README commands end to end
def test_precomputed_reference(workspace, tmp_path):
    precompute_cmd, train_cmd = group_commands("precomputed")
    prepped = tmp_path / "prepped"  # precompute adds columns to the shards: work on a copy
    shutil.copytree(workspace.prepped, prepped)
    workspace.run(workspace.substitute(precompute_cmd, prepped=prepped))
    import datasets

    columns = datasets.load_from_disk(str(prepped / "train")).column_names
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(columns)
    done = workspace.run(workspace.substitute(train_cmd, prepped=prepped) + REDUCED_TRAINING)
    assert_trained(workspace.runs / "my_precomputed")
    assert "reference: precomputed" in done.stdout + done.stderr


@pytest.mark.distributed
def test_zero3_several_processes(workspace):
    """Reduced: 2 CPU processes (gloo) instead of 8 GPUs."""
    (command,) = group_commands("zero3")
    reduced = workspace.substitute(command).replace("NUM_PROCESSES=8", "NUM_PROCESSES=2")
    done = workspace.run(f"MAIN_PROCESS_PORT={free_port()} {reduced}{REDUCED_TRAINING}")
    assert "2 per device x 1 accumulation x 2 processes" in done.stdout + done.stderr
    assert_trained(workspace.runs / "zero3")


@pytest.mark.distributed
def test_trl_recipe(workspace, tmp_path):
    """alignment-handbook's zephyr-7b-beta full recipe (tests/fixtures/alignment_handbook/) with its model and dataset
    ids pointed at local copies, reduced like the training commands and to 2 CPU processes instead of 8. The
    several-process run goes first, on an empty cache: its main process prepares the data once while the other
    waits; the single-process run then reuses it."""
    from test_trl_recipes import localised, machine_facts, make_datasets
    local = {"model": workspace.model, "datasets": make_datasets(tmp_path / "datasets")}
    recipe = localised(ROOT / "tests/fixtures/alignment_handbook/zephyr-7b-beta__config_full.yaml", local, tmp_path)
    single, several = group_commands("trl")
    env = {"DPO_DATA_CACHE": str(tmp_path / "cache")}
    reduced = f"{REDUCED_TRAINING} {' '.join(machine_facts())}"
    several = several.replace("NUM_PROCESSES=8", "NUM_PROCESSES=2").replace("config_full.yaml", str(recipe))
    done = workspace.run(f"MAIN_PROCESS_PORT={free_port()} {several} --output_dir {workspace.runs}/trl2{reduced}",
                         env=env)
    assert (done.stdout + done.stderr).count("[dpo] data: prepared ") == 1
    assert "2 per device x 1 accumulation x 2 processes" in done.stdout + done.stderr
    assert_trained(workspace.runs / "trl2")
    done = workspace.run(f"{single.replace('config_full.yaml', str(recipe))} --output_dir {workspace.runs}/trl1"
                         f"{reduced}", env=env)
    assert "[dpo] data: reused " in done.stdout
    assert_trained(workspace.runs / "trl1")
    assert len(list((tmp_path / "cache").iterdir())) == 1


@pytest.mark.distributed
@pytest.mark.parametrize("group, out_name, batch_line", [
    ("multi_node", "shared_dpo", "2 per device x 1 accumulation x 2 processes"),
    ("sequence_parallel", "shared_dpo_long", "2 per device x 1 accumulation x 1 sequence-parallel groups"),
])
def test_multi_node(workspace, group: str, out_name: str, batch_line: str):
    """Reduced: both "machines" on this one (127.0.0.1), one process each, started at the same time; a
    sequence-parallel group of 2 (the 2 processes there are) instead of 8."""
    commands = group_commands(group)
    shutil.rmtree(workspace.runs / out_name, ignore_errors=True)
    assert [re.search(r"MACHINE_RANK=(\d)", c).group(1) for c in commands] == ["0", "1"]
    port = str(free_port())
    procs = []
    for command in commands:
        reduced = workspace.substitute(command).replace("NUM_PROCESSES=16", "NUM_PROCESSES=2") \
            .replace("MAIN_PROCESS_IP=10.0.0.1", "MAIN_PROCESS_IP=127.0.0.1") \
            .replace("MAIN_PROCESS_PORT=29500", f"MAIN_PROCESS_PORT={port}") \
            .replace("--sequence_parallel_size 8", "--sequence_parallel_size 2")
        procs.append(subprocess.Popen(["bash", "-c", reduced + REDUCED_TRAINING], cwd=ROOT, env=run_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(proc.returncode == 0 for proc in procs), "\n\n".join(o[-4000:] for o in outputs)
    assert batch_line in outputs[0]
    assert_trained(workspace.runs / out_name)


@pytest.mark.distributed
def test_slurm_sbatch(workspace, tmp_path):
    """Reduced: no SLURM here, so `sbatch`, `srun` and `scontrol` are small scripts on PATH that do what they do for
    a one-node allocation on this machine: sbatch runs the script, srun runs its command once, scontrol lists
    127.0.0.1 as the node. The script itself runs unchanged; GPUS_PER_NODE=2 CPU processes."""
    (command,) = group_commands("slurm")
    shutil.rmtree(workspace.runs / "shared_dpo", ignore_errors=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shims = {
        "sbatch": '#!/usr/bin/env bash\nexec bash "$@"\n',
        "srun": '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n',
        "scontrol": '#!/usr/bin/env bash\necho 127.0.0.1\n',
    }
    for name, text in shims.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "2",
           "MAIN_PROCESS_PORT": str(free_port())}
    done = workspace.run(workspace.substitute(command) + REDUCED_TRAINING, env=env)
    assert "2 per device x 1 accumulation x 2 processes" in done.stdout + done.stderr
    assert_trained(workspace.runs / "shared_dpo")


@pytest.mark.slow  # README commands end to end
def test_benchmarks(workspace, tmp_path):
    """Reduced: a tiny model and workload instead of the 28M-parameter one, three rows, 300 pairs instead of
    20,000. Without trl (the `bench` extra) the TRL row is left out rather than the command skipped."""
    bench_cmd, prep_cmd = group_commands("bench")
    tiny = ("--hidden-size 32 --num-layers 2 --vocab-size 400 --max-length 64 --batch-size 4 --steps 1 --warmup 1 "
            f"--max-tokens-per-row 128 --matmul-size 64 --no-bf16 --workdir {tmp_path / 'work'} "
            f"--output {tmp_path / 'bench.json'} "
            "--rows trl/model,padded/model,prefix_shared/model")  # one process per row: keep two of ours
    try:
        import trl  # noqa: F401
    except ImportError:
        bench_cmd = bench_cmd.replace(" --vs-trl", "")
    done = workspace.run(f"{bench_cmd} {tiny}")
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert any(n.startswith("prefix_shared") for n in names) and any(n.startswith("padded") for n in names)
    assert ("trl" in " ".join(names).lower()) == ("--vs-trl" in bench_cmd)
    assert "tokens/s" in done.stdout or "tok/s" in done.stdout
    prep_json = tmp_path / "bench_prep.json"
    workspace.run(prep_cmd.replace("--pairs 20000", "--pairs 300 --vocab_size 500")
                  .replace("bench_results/bench_prep.json", str(prep_json)))
    assert json.loads(prep_json.read_text())


@pytest.mark.slow  # README commands end to end
def test_ranked(workspace):
    """The README's k-answer commands: prep reads 4 scored answers per prompt, training runs plackett_luce on them
    in k-branch rows and logs the ranking metrics."""
    prep_cmd, train_cmd = group_commands("ranked")
    workspace.run(workspace.substitute(prep_cmd))
    report = json.loads((workspace.root / "ranked" / "prep_report.json").read_text())
    assert report["answers_per_prompt"] == {"4": 40} and "responses_ids" in report["columns"]
    done = workspace.run(workspace.substitute(train_cmd) + REDUCED_TRAINING)
    out = workspace.runs / "my_listwise"
    assert_trained(out)
    assert "layout: packed with prefix sharing" in done.stdout + done.stderr
    first = read_metrics(out)[0]
    assert {"ranking/kendall_tau", "ranking/top_accuracy", "rewards/rank_4"} <= set(first)


@pytest.mark.slow  # a benchmark run, reduced
def test_bench_ranked(workspace, tmp_path):
    """Reduced: a tiny model, 1 measured step; without trl (the `bench` extra) the TRL row is left out."""
    (command,) = group_commands("bench_ranked")
    try:
        import trl  # noqa: F401
    except ImportError:
        command = command.replace(" --vs-trl", "")
    output = tmp_path / "bench_ranked.json"
    done = workspace.run(command.replace("bench_results/bench_ranked.json", str(output))
                         + f" --hidden-size 32 --num-layers 2 --vocab-size 400 --max-length 64 --steps 1 "
                         f"--workdir {tmp_path / 'work'}")
    rows = {r["name"]: r for r in json.loads(output.read_text())["rows"]}
    assert {"pairs/prefix_shared", "ranked/padded", "ranked/k_branch"} <= set(rows)
    assert ("trl/best_vs_rest" in rows) == ("--vs-trl" in command)
    assert "useful tok/s" in done.stdout
