"""Time `./launch.sh demo` end to end (target: under 5 minutes on 2 CPU cores) and record what it reached.

    python -m benchmarks.bench_demo [--seeds 0 1 2] [--quick] [--output bench_results/bench_demo.json]

Each seed is one full run in a fresh output dir, one after another. Reports wall-clock seconds and the CPU seconds
of the whole process tree (user + system; on a machine shared with other work the wall clock overstates the cost,
the CPU time does not), and the held-out numbers the demo printed. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(seed: int, *, quick: bool, workdir: Path) -> dict[str, Any]:
    out = workdir / f"demo_seed{seed}"
    command = ["./launch.sh", "demo", "--output_dir", str(out), "--seed", str(seed)] + (["--quick"] if quick else [])
    cpu_before, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu_before
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
                           f"{done.stderr[-3000:]}")
    summary = json.loads((out / "demo_summary.json").read_text())
    return {
        "seed": seed, "wall_seconds": wall, "cpu_seconds": cpu,
        "accuracy_before": summary["before"]["preference_accuracy"],
        "accuracy_after": summary["after"]["preference_accuracy"],
        "reward_accuracy_after": summary["after"]["reward_accuracy"],
        "reward_margin_after": summary["after"]["reward_margin"],
        "greedy_correct_before": summary["before"]["greedy_correct"],
        "greedy_correct_after": summary["after"]["greedy_correct"],
        "report_png": (out / "report.png").is_file(),
        "load_average_after": os.getloadavg()[0],
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'seed':>4} {'wall s':>7} {'cpu s':>7} {'acc before':>10} {'acc after':>9} {'greedy after':>12} "
            f"{'load':>5}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['seed']:>4} {r['wall_seconds']:7.1f} {r['cpu_seconds']:7.1f} {r['accuracy_before']:10.3f} "
                     f"{r['accuracy_after']:9.3f} {r['greedy_correct_after']:12.3f} {r['load_average_after']:5.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one full demo run per seed")
    parser.add_argument("--quick", action="store_true", help="time the reduced demo instead")
    parser.add_argument("--output", default="bench_results/bench_demo.json", help="where the JSON results go")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        rows = [run_once(seed, quick=args.quick, workdir=Path(tmp)) for seed in args.seeds]
    print(format_table(rows))
    result = {"command": "./launch.sh demo" + (" --quick" if args.quick else ""), "cpu_count": os.cpu_count(),
              "machine": platform.platform(), "python": sys.version.split()[0], "runs": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
