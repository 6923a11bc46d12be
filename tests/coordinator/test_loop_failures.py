"""The RL loop ends with the error of a task source that fails mid-run (a dataset that cannot be read
further, a generator that raises) instead of leaving the trainer waiting for batches that never come.
Real learner and torch rollout in process."""

from __future__ import annotations

import asyncio

import pytest
from transformers import AutoTokenizer

from coordinator.client.learner_api import LearnerSession
from coordinator.config import LoopConfig
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.envs.base import Problem, ProblemSource
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.loop import RLLoop
from learner.server import start_learner
from protos.adam import AdamParams
from protos.channels import open_channel
from tests.coordinator.fleet.test_replica_set import start_replica


class BrokenAfter(ProblemSource):
    """The copy_digit task, until problem `limit`: then the source fails."""

    def __init__(self, inner: ProblemSource, limit: int) -> None:
        self.inner, self.limit = inner, limit

    name = "broken-after"

    @property
    def num_problems(self) -> int | None:
        return None

    def problem(self, index: int) -> Problem:
        if index >= self.limit:
            raise OSError(f"the dataset could not be read past row {self.limit}")
        return self.inner.problem(index)


async def test_a_failing_task_source_ends_the_run_with_its_error(tiny_model_dir, learner_config):
    learner, _ = await start_learner(learner_config)
    rollout_server = await start_replica(tiny_model_dir)
    rollout = await ReplicaSet.connect([rollout_server.address])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    steps: list[int] = []
    try:
        async with open_channel(learner.address) as channel:
            session = await LearnerSession.create(channel, "anvil-tiny", lora_rank=0, seed=0)

            async def no_checkpoint(step: int, next_batch: int) -> None:
                return None

            config = LoopConfig(
                steps=6, groups_per_batch=2, group_size=2, max_tokens=1, max_off_policy_steps=0,
                sampler_concurrency=2, adam=AdamParams(learning_rate=1e-4),
            )  # fmt: skip
            source = BrokenAfter(build_source("copy_digit", None, 0), limit=4)
            loop = RLLoop(
                config=config, session=session, rollout=rollout, source=source,
                make_env=lambda problem: AnswerEnv(problem, tokenizer), seed=0, start_batch=0,
                on_step=lambda result: steps.append(result.step), on_checkpoint=no_checkpoint,
            )  # fmt: skip
            with pytest.raises(OSError, match="could not be read past row 4"):
                await asyncio.wait_for(loop.run(), timeout=120)
            await session.close()
    finally:
        await rollout.close()
        await rollout_server.stop(0)
        await learner.stop(0)
    assert steps == [1, 2], "the batches before the failure trained"
