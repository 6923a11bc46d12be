"""The RL loop, synchronous vs asynchronous, with an environment whose reward takes time.

Real services (a learner and a rollout replica started as processes, as `anvil run` does) and the real
`coordinator.loop.RLLoop` on the built-in copy_digit task; the only change is the environment, which
waits `--reward-latency-ms` before each score (a sandbox or a judge model would). The loop runs once
with `max_off_policy_steps = 0` (sample, score, train, publish, one after the other) and once with the
asynchronous bound (the next batch is sampled and scored while this one trains), on fresh services each
time and from the same seed.

Reported per mode: completed RL steps per minute in the steady state (the first steps, which pay
start-up and warm-up, are left out), the learner's idle fraction (1 - (train + weight sync) / wall
time), and the mean reward (the "equal reward quality" check: the same steps from the same start
should reach a similar reward). Target: async ≥ 1.8x the synchronous steps per minute.

    python -m bench.loop           # 100 ms per reward, anvil-tiny, vLLM rollout
    python -m bench.loop --quick   # 3 steps each, torch rollout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from bench.common import Ratio, Timing, base_parser, console, run_main, timing_table, write_results
from coordinator.client.learner_api import LearnerSession
from coordinator.config import LoopConfig, RunConfig, ServicesConfig
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.envs.base import Env, Problem, Score
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.loop import RLLoop, StepResult
from coordinator.models import resolve_model
from coordinator.objectives.policy_gradient import PolicyGradientConfig
from coordinator.services import start_services
from learner.config import LearnerConfig
from learner.server import start_learner
from protos.adam import AdamParams
from protos.channels import open_channel
from rollout.config import RolloutConfig, TorchEngineConfig, VllmEngineConfig
from rollout.server import start_rollout


class SlowRewardEnv(Env):
    """An environment whose verifier takes `latency_s` per completion (no CPU used while it waits)."""

    def __init__(self, inner: Env, latency_s: float) -> None:
        self.inner, self.latency_s = inner, latency_s

    async def prompt_tokens(self) -> list[int]:
        return await self.inner.prompt_tokens()

    async def score(self, completion_tokens: list[int]) -> Score:
        await asyncio.sleep(self.latency_s)
        return await self.inner.score(completion_tokens)


async def run_mode(args: argparse.Namespace, bound: int, model_dir: Path) -> dict:
    """One RL run with staleness bound `bound` on fresh services; per-step metrics and completion times."""
    from transformers import AutoTokenizer

    engine = TorchEngineConfig() if args.engine == "torch" else VllmEngineConfig()
    config = RunConfig(
        model=args.model,
        loop=LoopConfig(
            steps=args.steps,
            groups_per_batch=args.groups,
            group_size=args.group_size,
            max_tokens=1,
            max_off_policy_steps=bound,
            sampler_concurrency=args.groups,
            objective=PolicyGradientConfig(type="ppo"),
            adam=AdamParams(learning_rate=3e-4, eps=1e-8, grad_clip_norm=1.0),
        ),
        services=ServicesConfig(rollout_engine=engine),
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    source = build_source("copy_digit", None, 0)
    latency_s = args.reward_latency_ms / 1000

    def make_env(problem: Problem) -> Env:
        return SlowRewardEnv(AnswerEnv(problem, tokenizer), latency_s)

    steps: list[tuple[float, StepResult]] = []

    async def no_checkpoint(step: int, next_batch: int) -> None:
        return None

    with tempfile.TemporaryDirectory(prefix="anvil-bench-loop-") as run_dir:
        async with running_services(args, config, model_dir, Path(run_dir)) as (learner_address, rollouts, api_key):
            channel = open_channel(learner_address, api_key=api_key)
            rollout = await ReplicaSet.connect(rollouts, api_key=api_key)
            try:
                session = await LearnerSession.create(channel, str(model_dir), lora_rank=0, seed=0)
                loop = RLLoop(
                    config=config.loop,
                    session=session,
                    rollout=rollout,
                    source=source,
                    make_env=make_env,
                    seed=0,
                    start_batch=0,
                    on_step=lambda result: steps.append((time.perf_counter(), result)),
                    on_checkpoint=no_checkpoint,
                )
                await loop.run()
            finally:
                await channel.close()
                await rollout.close()
    return summarize(steps, args.warmup_steps)


@contextlib.asynccontextmanager
async def running_services(
    args: argparse.Namespace, config: RunConfig, model_dir: Path, run_dir: Path
) -> AsyncIterator[tuple[str, list[str], str | None]]:
    """Fresh learner + rollout: processes as `anvil run` starts them, or (smoke tests) in this process."""
    if not args.in_process:
        services = await start_services(
            config.services, config.model, model_dir, run_dir, learner_overrides=('backend.type="torch"',)
        )
        try:
            yield services.learner_address, services.rollout_addresses, services.api_key
        finally:
            services.stop()
        return
    rollout_server, rollout_servicer = await start_rollout(
        RolloutConfig(model=model_dir, engine=config.services.rollout_engine)
    )
    learner_server, _ = await start_learner(LearnerConfig(checkpoint_dir=run_dir / "learner"))
    try:
        yield learner_server.address, [rollout_server.address], None
    finally:
        await learner_server.stop(0)
        await rollout_server.stop(0)
        await rollout_servicer.engine.close()


def summarize(steps: list[tuple[float, StepResult]], warmup: int) -> dict:
    """Steady-state rate and learner idle fraction over the steps after `warmup`."""
    warmup = min(warmup, len(steps) - 2)
    window = steps[warmup:]
    wall_s = window[-1][0] - window[0][0]
    counted = [result.metrics for _, result in window[1:]]  # steps completed inside the window
    busy_s = sum(m["time/train_s"] + m["time/weight_sync_s"] for m in counted)
    rewards = [result.metrics["reward/mean"] for _, result in steps]
    return {
        "steps_per_min": len(counted) / wall_s * 60,
        "step_s": [m["time/step_s"] for m in counted],
        "learner_idle_fraction": 1 - busy_s / wall_s,
        "train_s_mean": float(np.mean([m["time/train_s"] for m in counted])),
        "weight_sync_s_mean": float(np.mean([m["time/weight_sync_s"] for m in counted])),
        "wait_for_samples_s_mean": float(np.mean([m["time/wait_for_samples_s"] for m in counted])),
        "reward_mean_all": float(np.mean(rewards)),
        "reward_mean_last_half": float(np.mean(rewards[len(rewards) // 2 :])),
        "rewards": rewards,
        "staleness_mean": float(np.mean([m["staleness/mean"] for m in counted])),
        "dropped_stale_groups": float(sum(m["groups/dropped_stale"] for _, r in steps for m in [r.metrics])),
    }


async def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.steps, args.groups, args.group_size, args.warmup_steps = 4, 2, 2, 1
        args.reward_latency_ms, args.engine, args.in_process = 5.0, "torch", True
    if args.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        args.engine = "torch"
        console.print("[yellow]vllm is not installed: rollout uses the torch engine[/]")
    model_dir = resolve_model(args.model)
    results = {}
    for name, bound in (("sync", 0), ("async", args.async_bound)):
        console.print(f"[bold]{name}[/] (max_off_policy_steps = {bound}) ...")
        results[name] = await run_mode(args, bound, model_dir)
    sync, asyn = results["sync"], results["async"]
    timings = [
        Timing(f"{name}: step time", r["step_s"], extra={k: v for k, v in r.items() if k != "step_s"})
        for name, r in results.items()
    ]
    console.print(timing_table("RL loop", timings))
    for name, r in results.items():
        console.print(
            f"  {name}: {r['steps_per_min']:.1f} steps/min, learner idle {r['learner_idle_fraction']:.0%}, "
            f"train {r['train_s_mean'] * 1e3:.0f} ms + sync {r['weight_sync_s_mean'] * 1e3:.0f} ms per step, "
            f"reward mean {r['reward_mean_all']:.3f} (last half {r['reward_mean_last_half']:.3f})"
        )
    ratios = [
        Ratio(
            "async / sync (steps per minute)",
            asyn["steps_per_min"] / sync["steps_per_min"],
            "completed RL steps per minute",
            1.8,
        ),
        Ratio(
            "async / sync (learner idle fraction)",
            asyn["learner_idle_fraction"] / max(sync["learner_idle_fraction"], 1e-9),
            "lower: the learner waits less",
            None,
            higher_is_better=False,
        ),
        Ratio(
            "async − sync (mean reward)",
            asyn["reward_mean_all"] - sync["reward_mean_all"],
            "reward quality over the same steps: a difference, not a ratio (≈ 0 is equal)",
            None,
        ),
    ]
    config = {
        "model": args.model,
        "engine": args.engine,
        "steps": args.steps,
        "groups_per_batch": args.groups,
        "group_size": args.group_size,
        "reward_latency_ms": args.reward_latency_ms,
        "async_bound": args.async_bound,
        "warmup_steps": args.warmup_steps,
        "in_process": args.in_process,
    }
    write_results("loop", args.out, config, timings, ratios, extra={"modes": results})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("loop", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-tiny")
    parser.add_argument("--engine", choices=["vllm", "torch"], default="vllm")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--groups", type=int, default=8, help="groups (prompts) per batch")
    parser.add_argument("--group-size", type=int, default=8, help="samples per prompt")
    parser.add_argument("--reward-latency-ms", type=float, default=100.0, help="time each reward takes")
    parser.add_argument("--async-bound", type=int, default=1, help="max_off_policy_steps of the async run")
    parser.add_argument(
        "--in-process", action="store_true", help="learner and rollout in this process (fast start; --quick sets it)"
    )
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the steady-state figures")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
