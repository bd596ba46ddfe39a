"""Draw report.png for any run from its metrics.jsonl: loss, reward margin, chosen and rejected rewards, preference
accuracies (implicit reward and log-prob) and the chosen answer's log-ratio to the reference against step, train and
eval; from step 0 when the run evaluated the starting model (`eval_on_start`).

    python -m dpo.report OUTPUT_DIR [--output OUTPUT_DIR/report.png]

Needs matplotlib (`pip install -e '.[report]'` from the clone, or `pip install matplotlib`; `./launch.sh demo`
installs it). Rendered off-screen (the Agg backend), so it works on a headless machine.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from dpo.atomic import write_file_atomic
from dpo.metrics import read_metrics

# (title, [(metric name, label)], what a healthy run looks like) - one panel each.
PANELS: tuple[tuple[str, tuple[tuple[str, str], ...], str], ...] = (
    ("loss", (("loss", "loss"),), "falls"),
    ("reward margin", (("rewards/margins", "chosen - rejected"),), "grows"),
    ("rewards", (("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")),
     "chosen steady or rising slowly, rejected falls"),
    ("preference accuracy", (("rewards/accuracies", "reward accuracy"), ("logps/accuracies", "log-prob accuracy")),
     "reward accuracy rises toward 1 (0 at step 0: ties)"),
    ("log-ratio to the reference, chosen", (("logratio/chosen", "log π − log π_ref"),),
     "stays within a few nats; a blow-up (either sign) means drift"),
)
SPLIT_STYLES = {"train": {"linestyle": "-", "alpha": 0.85}, "eval": {"linestyle": "--", "marker": "o",
                                                                     "markersize": 3}}
METRIC_COLORS = {"rewards/chosen": "tab:green", "rewards/rejected": "tab:red", "logps/accuracies": "tab:purple"}
# A series with this few points is drawn with a marker on each: a lone point drawn as a line is invisible.
FEW_POINTS = 30


def series(records: list[dict[str, Any]], split: str, name: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric in one split, skipping records without a finite value."""
    steps, values = [], []
    for record in records:
        value = record.get(name)
        if record.get("split") == split and isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def draw_report(output_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the figure (default OUTPUT_DIR/report.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(output_dir)
    if not records:
        raise ValueError(f"{Path(output_dir) / 'metrics.jsonl'} holds no records")
    path = Path(output) if output is not None else Path(output_dir) / "report.png"
    fig = draw_figure(records, f"DPO run: {Path(output_dir).resolve().name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomic(path, lambda temporary: fig.savefig(temporary, dpi=100, format="png"))
    plt.close(fig)
    return path


def draw_figure(records: list[dict[str, Any]], title: str) -> Any:
    """The figure: one panel per PANELS entry and a summary table (matplotlib's backend already chosen)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    flat = axes.ravel()
    for ax, (panel_title, metrics, healthy) in zip(flat, PANELS):
        for name, label in metrics:
            for split, style in SPLIT_STYLES.items():
                steps, values = series(records, split, name)
                if steps:
                    if len(steps) <= FEW_POINTS:
                        style = {"marker": "o", "markersize": 4, **style}
                    ax.plot(steps, values, label=f"{label} ({split})", color=METRIC_COLORS.get(name), **style)
        ax.set_title(f"{panel_title}\nhealthy: {healthy}", fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    flat[3].set_ylim(-0.05, 1.05)
    summary_ax = flat[5]
    summary_ax.axis("off")
    summary_ax.text(0.0, 1.0, summary_text(records), va="top", ha="left", family="monospace", fontsize=9,
                    transform=summary_ax.transAxes)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout()
    return fig


def summary_text(records: list[dict[str, Any]]) -> str:
    """The first and last value of each metric, train and eval, as a small table."""
    lines = ["                     first      last"]
    for split in ("train", "eval"):
        rows = [(name, series(records, split, name)[1]) for name in
                ("loss", "rewards/margins", "rewards/accuracies", "logratio/chosen", "logps/accuracies")]
        rows = [(name, values) for name, values in rows if values]
        if not rows:
            continue
        steps = series(records, split, rows[0][0])[0]
        lines.append(f"{split} (steps {steps[0]}-{steps[-1]})")
        lines += [f"  {name:<18} {values[0]:8.3f}  {values[-1]:8.3f}" for name, values in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="(path) a training run's output dir, holding "
                        "metrics.jsonl")
    parser.add_argument("--output", metavar="PATH", help="where to write the PNG (default: OUTPUT_DIR/report.png)")
    args = parser.parse_args(argv)
    try:
        path = draw_report(args.output_dir, args.output)
    except (FileNotFoundError, ValueError) as exc:
        print(f"dpo.report: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
