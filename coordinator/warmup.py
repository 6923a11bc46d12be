"""The supervised warmup before RL: a few cross-entropy steps on right answers, through the run's session.

A policy that never produces the answer's shape - here, digits separated by spaces and then EOS - earns
no reward and so gets no gradient from RL. A short supervised phase (RunConfig.warmup) gives RL a policy
that is right now and then, which group-relative advantages can then sharpen. The phase is deliberately
short: the run's first RL step still scores far below what RL takes it to.

Each step trains `batch_size` problems of the warmup's own source (another seed than the task's: another
draw, not a held-out set - `reverse` has only 1000 prompts, and most RL prompts also appear in the main
job's warmup, which is why it stops while 1 % of answers are exact) with Tinker's `cross_entropy` loss,
weights 1/targets so the loss
is the mean negative log-likelihood of the answer tokens (a sum would make grad clipping bite at once).
Each step's loss goes to warmup.jsonl; the learner's step counter advances, so the first RL step is
`steps + 1` and checkpoints, resume and weight versions keep counting learner steps.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import Datum
from coordinator.config import WarmupConfig
from coordinator.envs.answer_env import AnswerEnv
from coordinator.envs.base import Problem, ProblemSource
from coordinator.objectives.maths import supervised_datum
from protos.adam import AdamParams

WARMUP_FILE = "warmup.jsonl"


async def supervised_warmup(
    config: WarmupConfig,
    session: LearnerSession,
    source: ProblemSource,
    make_env: Callable[[Problem], AnswerEnv],
    adam: AdamParams,
    run_dir: Path,
    console: Console,
) -> int:
    """Run `config.steps` supervised steps on a fresh session; the learner's step afterwards."""
    if config.steps == 0:
        return int(session.info.step)
    adam = dataclasses.replace(adam, learning_rate=config.learning_rate)
    started, first_loss, loss = time.perf_counter(), None, float("nan")
    step = int(session.info.step)
    for index in range(config.steps):
        envs = [make_env(problem) for problem in problems(source, index * config.batch_size, config.batch_size)]
        data = await warmup_data(envs)
        output = await session.forward_backward(data, "cross_entropy")
        loss = output.metrics["loss:sum"]  # -sum(weights * logprobs): with weights 1/targets, the mean NLL
        step = int((await session.optim_step(adam)).step)
        first_loss = loss if first_loss is None else first_loss
        with (run_dir / WARMUP_FILE).open("a") as handle:
            handle.write(json.dumps({"step": step, "loss/mean_nll": loss, "wall_s": time.perf_counter() - started}))
            handle.write("\n")
        if (index + 1) % 10 == 0 or index + 1 == config.steps:
            console.print(f"warmup {index + 1:>4}/{config.steps}  loss {loss:.3f}", markup=False)
    session.info.step = step
    console.print(
        f"warmup: {config.steps} supervised steps in {time.perf_counter() - started:.0f} s, answer loss "
        f"{first_loss:.3f} -> {loss:.3f}; RL starts at step {step + 1}",
        markup=False,
        soft_wrap=True,
    )
    return step


async def warmup_data(envs: Sequence[AnswerEnv]) -> list[Datum]:
    """One warmup step's data: each problem's right answer (and EOS) for `cross_entropy`, weights 1/targets
    over the whole step, so the loss is the mean NLL of the answer tokens."""
    pairs = [(await env.prompt_tokens(), env.reference_completion()) for env in envs]
    weight = 1.0 / sum(len(completion) for _, completion in pairs)
    return [supervised_datum(prompt, completion, weight) for prompt, completion in pairs]


def problems(source: ProblemSource, start: int, count: int) -> list[Problem]:
    """`count` problems from `start`, wrapping around a finite source."""
    size = source.num_problems
    return [source.problem((start + offset) % size if size else start + offset) for offset in range(count)]
