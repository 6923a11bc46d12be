"""Anvil against TRL's GRPOTrainer on the same laptop, back to back: same model, task, prompts, reward and
hyper-parameters (bench/peers_trl.py says what TRL needs set to match, and why).

For each system: wall-clock and steps until the 5-step mean reward first reaches 0.8 (wall-clock from
the start of training: TRL's `train()`, Anvil's first step as `anvil run` times it, services already
up), steps per minute, and the learner's idle fraction (TRL: time generating inside its step; Anvil: time
its learner waits for samples). Both run once per sampling seed (`--seeds`, three by default: one seed's
steps to the bar vary by about +-5 steps, the size of the differences in question), and the ratios compare
the medians over seeds: Anvil's wall-clock to 0.8 over TRL's (target <= 0.7, the aim 0.5) and Anvil's
steps over TRL's (target <= 1.0). A PNG of reward against wall-clock for both (the first seed) goes next
to the JSON.

    .venv/bin/pip install -e '.[peers]'         # TRL, pinned (an optional extra)
    .venv/bin/python -m bench.peers             # copy_digit: TRL, then configs/copy_digit.toml
    .venv/bin/python -m bench.peers --quick     # a few steps each (the smoke test)

    .venv/bin/python -m bench.peers --config configs/tiny.toml --out bench/results/peers_reverse.json

A config with a supervised warmup (the main job's multi-token `reverse`) runs that warmup once, through
Anvil's learner (bench/peers_warmup.py), and both systems start RL from the warmed-up model.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, Ratio, Timing, base_parser, console, run_main, write_results
from bench.peers_trl import trl_rows
from bench.peers_warmup import warmed_model
from coordinator.config import RunConfig
from coordinator.models import resolve_model
from servicekit.config import load_config

REWARD_BAR = 0.8
WINDOW = 5
REPO_ROOT = Path(__file__).resolve().parents[1]


def first_reaching(rows: list[dict[str, Any]], bar: float = REWARD_BAR) -> dict[str, Any] | None:
    """The first row whose trailing WINDOW-step mean reward is at least `bar` (None if none is)."""
    for index in range(WINDOW - 1, len(rows)):
        window = [row["reward"] for row in rows[index - WINDOW + 1 : index + 1]]
        if sum(window) / WINDOW >= bar:
            return {**rows[index], "steps": index + 1}
    return None


def anvil_rows(config_path: Path, steps: int, run_dir: Path, settings: list[str] = ()) -> list[dict[str, Any]]:
    """`anvil run CONFIG` for `steps` steps with `settings` (--set each); per RL step: step, wall_s, reward,
    idle_s (waiting for samples)."""
    command = [sys.executable, "-m", "coordinator", "run", str(config_path), "--run-dir", str(run_dir)]
    for setting in [f"loop.steps={steps}", "loop.checkpoint_every=0", *settings]:
        command += ["--set", setting]
    subprocess.run(command, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
    rows, idle = [], 0.0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        metrics = json.loads(line)
        idle += metrics.get("time/wait_for_samples_s", 0.0)
        rows.append(
            {"step": metrics["step"], "wall_s": metrics["wall_s"], "reward": metrics["reward/mean"], "idle_s": idle}
        )
    return rows


def step_seconds(rows: list[dict[str, Any]]) -> list[float]:
    walls = [0.0, *(row["wall_s"] for row in rows)]
    return [later - earlier for earlier, later in itertools.pairwise(walls)]


def summary(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    reached = first_reaching(rows)
    wall = rows[-1]["wall_s"] if rows else 0.0
    return {
        "system": name,
        "steps_run": len(rows),
        "steps_to_bar": reached["steps"] if reached else None,
        "wall_s_to_bar": reached["wall_s"] if reached else None,
        "steps_per_min": 60 * len(rows) / wall if wall else None,
        "learner_idle_fraction": rows[-1]["idle_s"] / wall if wall else None,
        "final_5_step_reward": sum(r["reward"] for r in rows[-WINDOW:]) / min(len(rows), WINDOW) if rows else None,
    }


def plot(curves: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for name, rows in curves.items():
        axis.plot([r["wall_s"] for r in rows], [r["reward"] for r in rows], label=name)
    axis.axhline(REWARD_BAR, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("wall-clock since training started (s)")
    axis.set_ylabel("mean reward per step")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


async def race(
    config: RunConfig, args: argparse.Namespace, seed: int, steps: int, model_dir: Path, settings: list[str],
    scratch: Path,
) -> dict:  # fmt: skip
    """TRL, then Anvil, both from `model_dir` and sampling with `seed` (the prompts are the task's, the
    same for every seed)."""
    loop = config.loop
    settings = [*settings, f"seed={seed}"]
    console.print(f"seed {seed}: TRL {config.task.name}, up to {steps} steps")
    trl, trl_settings = trl_rows(
        model_dir, config.task.name, config.task.seed, seed, steps, loop.groups_per_batch,
        loop.group_size, loop.max_tokens, loop.adam.learning_rate, scratch / f"trl-{seed}",
        None if args.quick else REWARD_BAR,
    )  # fmt: skip
    # --quick (the smoke test) samples with the torch engine: the bench's plumbing, without vLLM's start.
    settings += ['services.rollout_engine.type="torch"'] if args.quick else []
    console.print(f"seed {seed}: Anvil {args.config}, {steps} steps {' '.join(settings)}")
    anvil = anvil_rows(args.config, steps, scratch / f"anvil-{seed}", settings)
    return {"seed": seed, "trl": trl, "anvil": anvil, "trl_settings": trl_settings, "anvil_settings": settings}


def median_of(summaries: list[dict[str, Any]], key: str) -> float | None:
    """The median over seeds, None if any seed missed the bar (a miss is not a number to average)."""
    values = [summary[key] for summary in summaries]
    return statistics.median(values) if values and None not in values else None


async def main(args: argparse.Namespace) -> None:
    config = load_config(RunConfig, args.config, [])
    steps = 6 if args.quick else args.steps
    seeds = args.seeds[:1] if args.quick else args.seeds
    with tempfile.TemporaryDirectory(prefix="anvil-peers-") as scratch:
        model_dir, settings = resolve_model(config.model), list(args.anvil_set)
        if config.warmup.steps:  # both race from Anvil's warmed-up model (once): RL against RL
            model_dir = await warmed_model(config, Path(scratch) / "warmup", console)
            settings += [f'model="{model_dir}"', "warmup.steps=0"]
        races = [
            await race(config, args, seed, steps, model_dir, settings, Path(scratch) / f"seed-{seed}") for seed in seeds
        ]
    per_seed = [
        {"seed": r["seed"], "trl": summary("trl", r["trl"]), "anvil": summary("anvil", r["anvil"])} for r in races
    ]
    for row in per_seed:
        console.print(row)
    trl_summaries, anvil_summaries = [r["trl"] for r in per_seed], [r["anvil"] for r in per_seed]
    medians = {
        system: {key: median_of(summaries, key) for key in ("steps_to_bar", "wall_s_to_bar", "steps_per_min")}
        for system, summaries in (("trl", trl_summaries), ("anvil", anvil_summaries))
    }
    ratios = [
        Ratio("steps per minute: anvil / trl", medians["anvil"]["steps_per_min"] / medians["trl"]["steps_per_min"],
              "Anvil's training steps per minute over TRL's (no target: the race is to the reward bar)")
    ]  # fmt: skip
    over = f"median over seeds {', '.join(map(str, seeds))}"
    if medians["trl"]["wall_s_to_bar"] and medians["anvil"]["wall_s_to_bar"]:
        ratios.append(
            Ratio("wall-clock to 0.8: anvil / trl", medians["anvil"]["wall_s_to_bar"] / medians["trl"]["wall_s_to_bar"],
                  f"Anvil's seconds to a 5-step mean reward of 0.8 over TRL's ({over})", 0.7, higher_is_better=False)
        )  # fmt: skip
    if medians["trl"]["steps_to_bar"] and medians["anvil"]["steps_to_bar"]:
        ratios.append(
            Ratio("steps to 0.8: anvil / trl", medians["anvil"]["steps_to_bar"] / medians["trl"]["steps_to_bar"],
                  f"Anvil's steps to a 5-step mean reward of 0.8 over TRL's ({over})", 1.0, higher_is_better=False)
        )  # fmt: skip
    picture = args.out.with_suffix(".png")
    plot({"TRL GRPOTrainer": races[0]["trl"], "Anvil": races[0]["anvil"]}, picture)
    timings = [
        Timing(f"{name}: seconds per step", [t for r in races for t in step_seconds(r[name])])
        for name in ("trl", "anvil")
    ]
    write_results(
        "peers", args.out,
        {"config": str(args.config), "steps": steps, "seeds": seeds, "trl": races[0]["trl_settings"],
         "anvil_settings": races[0]["anvil_settings"]},
        timings, ratios,
        notes=[f"reward against wall-clock (seed {seeds[0]}): {picture}"],
        extra={"medians": medians, "per_seed": per_seed,
               "curves": {f"{name}-seed-{r['seed']}": r[name] for r in races for name in ("trl", "anvil")}},
    )  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("peers", __doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "copy_digit.toml")
    parser.add_argument("--steps", type=int, default=300, help="most steps each (TRL stops at the bar)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2],
        help="sampling seeds: both systems run once per seed, and the ratios compare medians",
    )  # fmt: skip
    parser.add_argument(
        "--anvil-set", action="append", default=[], metavar="KEY=VALUE", help="a setting for Anvil's run (repeatable)"
    )
    parser.set_defaults(out=RESULTS_DIR / "peers.json")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
