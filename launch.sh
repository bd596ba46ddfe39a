#!/usr/bin/env bash
# dpo-pipeline's one entry point.
#
#   ./launch.sh demo  [--output_dir DIR] [...]      the whole pipeline on a tiny model, on a CPU, in minutes
#   ./launch.sh test  [pytest args]                 the test suite (installs the package and its test extras if missing)
#   ./launch.sh prep  --input F --tokenizer T --output D [...]      python -m data_prep
#   ./launch.sh train [--accelerate_config FILE] --config recipe.yaml [--name value ...]
#   ./launch.sh bench [--vs-trl] [...]              python -m dpo.bench
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PYTHON=${PYTHON:-python3}

ensure_installed() {
  # Install only when something is missing, so repeated runs stay fast and offline-friendly.
  local extras=$1 probe=$2
  if ! "$PYTHON" -c "$probe" >/dev/null 2>&1; then
    echo "[launch.sh] installing dpo-pipeline[$extras] into $("$PYTHON" -c 'import sys; print(sys.prefix)')" >&2
    "$PYTHON" -m pip install -q -e ".[$extras]"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  test)
    ensure_installed test "import dpo, data_prep, pytest, hypothesis, flake8, isort, matplotlib"
    "$PYTHON" -m flake8 dpo data_prep tests benchmarks
    "$PYTHON" -m isort --check-only --diff dpo data_prep tests benchmarks
    exec "$PYTHON" -m pytest "$@"
    ;;
  prep)
    ensure_installed test "import data_prep"
    exec "$PYTHON" -m data_prep "$@"
    ;;
  train)
    ensure_installed test "import dpo"
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
    exec "$PYTHON" -m dpo.launch "${launch[@]}" -m dpo.train "${args[@]}"
    ;;
  demo)
    ensure_installed "test" "import dpo, data_prep, matplotlib"
    exec "$PYTHON" -m dpo.demo "$@"
    ;;
  bench)
    ensure_installed test "import dpo"
    exec "$PYTHON" -m dpo.bench "$@"
    ;;
  help|-h|--help)
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    ;;
  *)
    echo "launch.sh: unknown subcommand '$cmd' (expected demo, test, prep, train or bench)" >&2
    exit 2
    ;;
esac
