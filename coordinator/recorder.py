"""What a run leaves in its directory: metrics.jsonl, consumed.jsonl, TensorBoard events, a PNG of the
curves, and a live console view.

metrics.jsonl has one JSON object per step (`step`, `batch`, `wall_s` - seconds since training started, the learner
session created - and every metric of the step).
consumed.jsonl records which problems each step consumed, so exactly-once can be audited. On resume,
both are cut back to the checkpoint's step before the loop continues.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from coordinator.fleet.health import ReplicaState
from coordinator.loop import StepResult

METRICS_FILE = "metrics.jsonl"
CONSUMED_FILE = "consumed.jsonl"
PLOT_FILE = "curves.png"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL log; a torn last line (the writer was killed mid-write) is ignored."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise
    return rows


def truncate_to_step(path: Path, step: int) -> None:
    """Keep only the lines of steps <= step (work after a checkpoint is redone on resume)."""
    kept = [row for row in read_jsonl(path) if row["step"] <= step]
    path.write_text("".join(json.dumps(row) + "\n" for row in kept))


class Recorder:
    """Writes every step to the run directory and shows a live progress bar with the key numbers."""

    def __init__(self, run_dir: Path, total_steps: int, console: Console | None = None, print_every: int = 10) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.console = console or Console()
        self.print_every = print_every
        self.started = time.time()
        self._training_started = False
        self._printed = False  # the first step is always printed (after a warmup it is not step 1)
        self._tensorboard = _tensorboard_writer(run_dir / "tensorboard")
        self._progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=self.console,
        )
        self._task = self._progress.add_task("run", total=total_steps, status="waiting for the first batch")
        self._progress.start()

    def training_started(self) -> None:
        """Count `wall_s` from now: the learner session exists (model and optimizer built), so the clock
        measures training, as TRL's `on_train_begin` does for the peers benchmark. Only the first call
        counts: after a learner restart the clock runs on."""
        if not self._training_started:
            self._training_started = True
            self.started = time.time()

    def on_step(self, result: StepResult) -> None:
        row = {"step": result.step, "batch": result.batch, "wall_s": time.time() - self.started, **result.metrics}
        with (self.run_dir / METRICS_FILE).open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        with (self.run_dir / CONSUMED_FILE).open("a") as handle:
            handle.write(
                json.dumps({"step": result.step, "batch": result.batch, "problems": result.problem_indices}) + "\n"
            )
        if self._tensorboard is not None:
            for key, value in result.metrics.items():
                self._tensorboard.add_scalar(key, value, result.step)
        self._progress.update(self._task, completed=result.step, status=self._status(row))
        if result.step % self.print_every == 0 or not self._printed or result.step == self.total_steps:
            self._printed = True
            self._progress.console.print(f"step {row['step']:>4}  {self._status(row)}")

    @staticmethod
    def _status(row: dict) -> str:
        return (
            f"reward {row['reward/mean']:.3f} kl {row.get('kl_sample_train/v1', float('nan')):+.3f} "
            f"stale {row['staleness/max']:.0f} tok/s {row['tokens/per_s']:.0f} "
            f"sync {row['time/weight_sync_s'] * 1000:.0f}ms{_fleet_status(row)}"
        )

    def close(self) -> None:
        self._progress.stop()
        if self._tensorboard is not None:
            self._tensorboard.close()
        rows = read_jsonl(self.run_dir / METRICS_FILE)
        if rows:
            plot_curves(rows, self.run_dir / PLOT_FILE)
            self.console.print(summary_table(rows))


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))


def summary_table(rows: list[dict]) -> Table:
    table = Table(title="run summary")
    for column in ("", "first step", "last 5 steps"):
        table.add_column(column, justify="right")
    tail = rows[-5:]

    def avg(key: str, part: list[dict]) -> str:
        values = [r[key] for r in part if key in r]
        return f"{sum(values) / len(values):.3f}" if values else "-"

    for key in ("reward/mean", "correct/mean", "loss/sum", "kl_sample_train/v1", "time/weight_sync_s", "tokens/per_s"):
        table.add_row(key, avg(key, rows[:1]), avg(key, tail))
    return table


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    figure, (reward_axis, loss_axis) = plt.subplots(1, 2, figsize=(10, 3.5))
    reward_axis.plot(steps, [r["reward/mean"] for r in rows], label="reward")
    reward_axis.plot(steps, [r["correct/mean"] for r in rows], label="exact answers", alpha=0.7)
    reward_axis.set_xlabel("step")
    reward_axis.set_ylim(0, 1.05)
    reward_axis.legend()
    reward_axis.set_title("reward")
    loss_axis.plot(steps, [r.get("loss/sum", float("nan")) for r in rows], color="tab:red")
    loss_axis.set_xlabel("step")
    loss_axis.set_title("loss (sum over tokens)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


_STATE_NAMES = [state.value for state in ReplicaState]
"""A replica's state code in metrics is its index here (ReplicaSet.metrics)."""


def _fleet_status(row: dict) -> str:
    """ " replicas 1/2 (replica-0 restarting)": how many serve, and which do not, with their state."""
    states = {
        key.split("/")[1]: int(v) for key, v in row.items() if key.startswith("fleet/") and key.endswith("/state")
    }
    if len(states) < 2 and all(code == 0 for code in states.values()):
        return ""
    unwell = [f"{name} {_STATE_NAMES[code]}" for name, code in states.items() if code != 0]
    return f" replicas {len(states) - len(unwell)}/{len(states)}" + (f" ({', '.join(unwell)})" if unwell else "")
