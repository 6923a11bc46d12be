"""A step's groups as they arrive (coordinator.step_inputs): passes take what is there, later batches wait."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from coordinator.envs.base import Problem
from coordinator.objectives import ScoredGroup
from coordinator.step_inputs import BatchArrivals, merge_pass_metrics


def group(batch: int, index: int) -> ScoredGroup:
    return ScoredGroup(batch, Problem(index=index, prompt="", answer=""), [1], [], [], [], 0, 0.0)


async def test_a_pass_waits_for_its_minimum_then_takes_every_group_scored_by_then():
    scored: asyncio.Queue = asyncio.Queue()
    pending: defaultdict[int, list[ScoredGroup]] = defaultdict(list)
    arrivals = BatchArrivals(scored, pending, batch=0)
    for item in (group(0, 3), group(1, 7), group(0, 1), group(0, 2)):
        scored.put_nowait(item)
    first = await arrivals.take(2)
    assert [g.problem.index for g in first] == [1, 2, 3], "every group of the batch already scored, in order"
    assert [g.problem.index for g in pending[1]] == [7], "a later batch's group waits for its own step"

    asyncio.get_running_loop().call_later(0.05, scored.put_nowait, group(0, 0))
    second = await arrivals.take(1)
    assert [g.problem.index for g in second] == [0]
    assert arrivals.waited_s >= 0.04

    scored.put_nowait(RuntimeError("sampler failed"))
    with pytest.raises(RuntimeError, match="sampler failed"):
        await BatchArrivals(scored, pending, batch=1).take(2)


def test_pass_metrics_merge_into_the_steps():
    keys = ("loss/sum", "learner/micro_batches", "learner/peak_memory_gib", "learner/tokens_per_s")
    passes = [dict(zip(keys, (2.0, 1.0, 0.5, 10.0), strict=True)), dict(zip(keys, (4.0, 2.0, 0.7, 30.0), strict=True))]
    merged = merge_pass_metrics(passes, loss_scale=0.5)
    assert merged == {
        "loss/sum": 3.0,
        "learner/micro_batches": 3.0,
        "learner/peak_memory_gib": 0.7,
        "learner/tokens_per_s": 20.0,
        "train/passes": 2.0,
    }
