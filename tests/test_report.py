"""dpo.report: report.png drawn from a real short run's metrics.jsonl; the plotted series and the summary are the
logged values, read back independently; the CLI's exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from builders import make_data_dir, make_model_dir, make_tokenizer
from dpo.config import load_config
from dpo.report import PANELS, draw_report, main, series, summary_text
from dpo.train import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """6 steps of DPO on the tiny sums data, logged every step, evaluated every 3 steps."""
    root = tmp_path_factory.mktemp("report_run")
    tokenizer = make_tokenizer()
    model = make_model_dir(root / "model", tokenizer, seed=0)
    data = make_data_dir(root / "data", tokenizer, n_train=32, n_eval=8, seed=0)
    out = root / "run"
    train(load_config(["--model_path", str(model), "--data_path", str(data), "--output_dir", str(out),
                       "--max_steps", "6", "--eval_steps", "3", "--batch_size", "4", "--learning_rate", "1e-3"]))
    return out


def logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_series_are_the_logged_values(run_dir):
    records = logged(run_dir)
    train_rows = [r for r in records if r["split"] == "train"]
    eval_rows = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in eval_rows] == [3, 6]
    for _, metrics, _ in PANELS:
        for name, _ in metrics:
            assert series(records, "train", name) == ([r["step"] for r in train_rows], [r[name] for r in train_rows])
            assert series(records, "eval", name) == ([3, 6], [r[name] for r in eval_rows])


def test_series_skips_missing_and_non_finite_values():
    name = "logratio/chosen"
    records = [{"step": 1, "split": "train", name: 0.5}, {"step": 2, "split": "train", name: float("nan")},
               {"step": 3, "split": "train"}, {"step": 4, "split": "eval", name: 1.0},
               {"step": 5, "split": "train", name: 2}]
    assert series(records, "train", name) == ([1, 5], [0.5, 2.0])
    assert series(records, "eval", name) == ([4], [1.0])


def test_summary_holds_first_and_last_values(run_dir):
    records = logged(run_dir)
    text = summary_text(records)
    first_train, last_train = records[0], [r for r in records if r["split"] == "train"][-1]
    last_eval = [r for r in records if r["split"] == "eval"][-1]
    lines = text.splitlines()
    train_loss = lines[lines.index("train (steps 1-6)") + 1].split()
    assert train_loss[0] == "loss"
    assert float(train_loss[1]) == pytest.approx(first_train["loss"], abs=5e-4)
    assert float(train_loss[2]) == pytest.approx(last_train["loss"], abs=5e-4)
    eval_acc = lines[lines.index("eval (steps 3-6)") + 3].split()
    assert eval_acc[0] == "rewards/accuracies"
    assert float(eval_acc[2]) == pytest.approx(last_eval["rewards/accuracies"], abs=5e-4)


def test_report_png_is_drawn(run_dir, tmp_path):
    path = draw_report(run_dir)
    assert path == run_dir / "report.png"
    image = matplotlib.image.imread(str(path))
    assert image.shape[:2] == (850, 1500)  # 15 x 8.5 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # curves and text, not a blank canvas
    other = draw_report(run_dir, tmp_path / "sub" / "other.png")
    assert other.is_file() and other.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main([str(run_dir), "--output", str(out)]) == 0
    assert out.is_file() and f"wrote {out}" in capsys.readouterr().out
    assert main([str(tmp_path / "no_such_run")]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    assert main([str(tmp_path / "empty")]) == 1


def test_module_entry_point(run_dir, tmp_path):
    """`python -m dpo.report OUTPUT_DIR` as the README shows it."""
    (run_dir / "report.png").unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-m", "dpo.report", str(run_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (run_dir / "report.png").is_file()


def short_run_records(steps: int) -> list[dict]:
    """A hand-written metrics.jsonl of `steps` train steps and one evaluation at the end."""
    rows = [{"step": s, "split": "train", "loss": 0.69 - 0.01 * s, "rewards/margins": 0.1 * s,
             "rewards/chosen": 0.01 * s, "rewards/rejected": -0.09 * s, "rewards/accuracies": 0.5,
             "logratio/chosen": 0.1 * s} for s in range(1, steps + 1)]
    return rows + [{**rows[-1], "split": "eval"}]


def test_a_three_step_run_is_drawn_as_points(tmp_path):
    """With few steps every logged value gets a marker (a lone point drawn as a line is invisible); the x ticks are
    whole steps; a long run stays a plain line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpo.report import draw_figure

    fig = draw_figure(short_run_records(3), "short")
    panels = [ax for ax in fig.axes if ax.lines]
    assert len(panels) == len(PANELS)
    for ax in panels:
        for line in ax.lines:
            assert line.get_marker() == "o", (ax.get_title(), line.get_label())
            assert list(line.get_xdata()) == ([1, 2, 3] if "(train)" in line.get_label() else [3])
        assert all(float(t).is_integer() for t in ax.get_xticks())
    plt.close(fig)
    long_fig = draw_figure(short_run_records(100), "long")
    train_lines = [line for ax in long_fig.axes for line in ax.lines if "(train)" in line.get_label()]
    assert train_lines and all(line.get_marker() in ("None", None, "") for line in train_lines)
    plt.close(long_fig)
    # the CLI on such a run's folder
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in short_run_records(3)))
    assert main([str(tmp_path)]) == 0 and (tmp_path / "report.png").is_file()
