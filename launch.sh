#!/usr/bin/env bash
# dpo-pipeline's one entry point.
#
#   ./launch.sh demo  [--output_dir DIR] [...]      python -m demo: the whole pipeline on a tiny model, on a CPU,
#                                                   in about a minute
#   ./launch.sh test  [--quick] [pytest args]       lint + the test suite (about 16 min on 2 cores; --quick: about 3)
#   ./launch.sh prep  --input F --tokenizer T --output D [...]      python -m data_prep
#   ./launch.sh train [--accelerate_config FILE] --config recipe.yaml [--name value ...]
#   ./launch.sh bench [--vs-trl] [...]              python -m benchmarks.bench_throughput (other benchmarks:
#                                                   python -m benchmarks.NAME, see benchmarks/__init__.py)
#   ./launch.sh SUBCOMMAND --help                   every option of that subcommand
#
# Each subcommand first installs what is missing into the active Python (saying what and how big); nothing is
# installed when everything imports. Without a GPU (no nvidia-smi) and without torch, the CPU build of torch is
# installed from the PyTorch CPU index (TORCH_INDEX_URL) instead of the default CUDA build. DPO_LAUNCH_DRY_RUN=1
# prints the install commands instead of running them. demo and bench run modules of this clone (demo/,
# benchmarks/: the package installs only dpo and data_prep), so they run from the repo root, as this script does.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

say() { echo "[launch.sh] $*" >&2; }

pip_install() {
  if [ "${DPO_LAUNCH_DRY_RUN:-}" = 1 ]; then
    say "would run: $PYTHON -m pip install $*"
  else
    "$PYTHON" -m pip install "$@"
  fi
}

ensure_torch() {
  "$PYTHON" -c "import torch" >/dev/null 2>&1 && return 0
  if command -v nvidia-smi >/dev/null 2>&1; then
    say "torch is not installed and this machine has an NVIDIA GPU: installing torch==$TORCH_VERSION with CUDA from"
    say "PyPI, a multi-GB download (torch and its nvidia-* CUDA libraries; the whole environment ends near 6 GB)."
    pip_install "torch==$TORCH_VERSION"
  else
    say "torch is not installed and this machine has no NVIDIA GPU (no nvidia-smi): installing the CPU build,"
    say "torch==$TORCH_VERSION from $TORCH_INDEX_URL (about 190 MB to download, 750 MB installed),"
    say "not PyPI's default CUDA build (several GB of CUDA libraries for a GPU this machine does not have)."
    pip_install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  fi
}

# The modules of install_requires (setup.cfg); run from the clone, dpo itself always imports.
CORE_MODULES="torch accelerate deepspeed transformers tokenizers peft datasets safetensors tensorboard yaml tqdm numpy"

ensure_installed() {
  # Install only when something is missing, so repeated runs stay fast and offline-friendly. The probe only looks
  # the modules up (importing torch and transformers would add seconds to every launch).
  local extras=$1 modules="$CORE_MODULES $2"
  local probe="import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
  # shellcheck disable=SC2086
  if ! "$PYTHON" -c "$probe" $modules >/dev/null 2>&1; then
    ensure_torch
    say "installing dpo-pipeline[$extras] (editable) and its dependencies into"
    say "$("$PYTHON" -c 'import sys; print(sys.prefix)'): transformers, accelerate, deepspeed, peft, datasets,"
    say "tensorboard and the extras: about 1 GB more (1.7 GB in all with the CPU build of torch), a few minutes."
    pip_install -e ".[$extras]"
  fi
}

wants_help() {
  local arg
  for arg in "$@"; do
    case "$arg" in -h|--help) return 0 ;; esac
  done
  return 1
}

usage() {
  # The comment block at the top of this file, without the '#'.
  sed -n '2,/^[^#]/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

test_usage() {
  cat <<'EOF'
usage: ./launch.sh test [--quick] [pytest args]

Runs flake8, isort and pytest (after installing the test extras if missing).
  (no flag)   the full suite, what CI runs: about 16 minutes on 2 CPU cores, 7 of them in the
              2-process distributed tests (DDP and DeepSpeed ZeRO over gloo)
  --quick     a subset that still touches every module, about 3 minutes on 2 cores: leaves out the
              tests marked `distributed` and `slow` (pytest -m "not distributed and not slow")
  pytest args are passed on, e.g. ./launch.sh test tests/test_losses.py -x
EOF
}

cmd=${1:-help}
shift || true
case "$cmd" in
  test)
    if wants_help "$@"; then test_usage; exit 0; fi
    quick=0
    args=()
    for arg in "$@"; do
      if [ "$arg" = --quick ]; then quick=1; else args+=("$arg"); fi
    done
    if [ $quick = 1 ]; then
      say "quick tests: every module, without the distributed and slow tests: about 3 minutes on 2 CPU cores"
      args=(-m "not distributed and not slow" ${args[@]+"${args[@]}"})
    else
      say "the full test suite takes about 16 minutes on 2 CPU cores (./launch.sh test --quick: about 3)"
    fi
    ensure_installed test "pytest hypothesis flake8 isort matplotlib"
    "$PYTHON" -m flake8 dpo data_prep demo benchmarks tests
    "$PYTHON" -m isort --check-only --diff dpo data_prep demo benchmarks tests
    exec "$PYTHON" -m pytest ${args[@]+"${args[@]}"}
    ;;
  prep)
    ensure_installed test ""
    exec "$PYTHON" -m data_prep "$@"
    ;;
  train)
    ensure_installed test ""
    if wants_help "$@"; then
      echo "./launch.sh train [--accelerate_config FILE (default accelerate_configs/single.yaml)] [flags below]"
      echo "Environment: NUM_PROCESSES, NUM_MACHINES, MACHINE_RANK, MAIN_PROCESS_IP, MAIN_PROCESS_PORT override it."
      echo
      exec "$PYTHON" -m dpo.train --help
    fi
    accel_config=accelerate_configs/single.yaml
    args=()
    while [ $# -gt 0 ]; do
      case "$1" in
        --accelerate_config) accel_config=$2; shift 2 ;;
        --accelerate_config=*) accel_config=${1#*=}; shift ;;
        *) args+=("$1"); shift ;;
      esac
    done
    # Multi-node settings come from the environment (one launcher per node, e.g. from SLURM).
    launch=(--config_file "$accel_config")
    [ -n "${NUM_PROCESSES:-}" ] && launch+=(--num_processes "$NUM_PROCESSES")
    [ -n "${NUM_MACHINES:-}" ] && launch+=(--num_machines "$NUM_MACHINES")
    [ -n "${MACHINE_RANK:-}" ] && launch+=(--machine_rank "$MACHINE_RANK")
    [ -n "${MAIN_PROCESS_IP:-}" ] && launch+=(--main_process_ip "$MAIN_PROCESS_IP")
    [ -n "${MAIN_PROCESS_PORT:-}" ] && launch+=(--main_process_port "$MAIN_PROCESS_PORT")
    # dpo.launch is accelerate launch keeping the exit status (2: a user error) without a launcher traceback.
    exec "$PYTHON" -m dpo.launch "${launch[@]}" -m dpo.train ${args[@]+"${args[@]}"}
    ;;
  demo)
    ensure_installed test matplotlib
    exec "$PYTHON" -m demo "$@"
    ;;
  bench)
    if wants_help "$@" || [[ " $* " != *" --vs-trl "* ]]; then
      ensure_installed test ""
    else
      ensure_installed test,bench trl
    fi
    exec "$PYTHON" -m benchmarks.bench_throughput "$@"
    ;;
  help|-h|--help)
    usage
    ;;
  *)
    echo "launch.sh: unknown subcommand '$cmd' (expected demo, test, prep, train or bench; ./launch.sh help)" >&2
    exit 2
    ;;
esac
