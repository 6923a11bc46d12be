"""Supervising the learner of an `anvil run`: noticing that it died or stopped answering, and when.

A learner killed mid-run fails the call in flight at once (its socket closes), but a learner that hangs
(SIGSTOP, a wedged collective, a machine swapping) fails nothing: every call just waits. So the run
health-checks the learner beside the loop (the standard gRPC health service, answered by the learner's
event loop while its compute runs in a worker thread) and declares it stopped after `failures_to_dead`
consecutive checks go unanswered. What happens then (restart it, reload the last checkpoint, rewind the
loop) is `coordinator/run.py`'s; this module only watches and waits.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from coordinator.config import LearnerWatchConfig
from coordinator.failures import ServiceFailure, answers

T = TypeVar("T")


async def watch(address: str, config: LearnerWatchConfig) -> None:
    """Return never; raise ServiceFailure (service "learner") once the learner at `address` has failed
    `failures_to_dead` health checks in a row."""
    failures = 0
    while True:
        await asyncio.sleep(config.probe_interval_s)
        failures = 0 if await answers(address, config.probe_timeout_s) else failures + 1
        if failures >= config.failures_to_dead:
            waited = failures * (config.probe_interval_s + config.probe_timeout_s)
            raise ServiceFailure(
                f"the learner at {address} stopped answering ({failures} health checks unanswered, ~{waited:.0f}s)",
                service="learner",
            )


async def watched(work: Awaitable[T], address: str, config: LearnerWatchConfig) -> T:
    """Await `work` while watching the learner; a learner declared stopped cancels `work` and raises."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch(address, config))
    try:
        await asyncio.wait([job, watcher], return_when=asyncio.FIRST_COMPLETED)
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            watcher.result()  # raises its ServiceFailure
        return job.result()
    finally:
        for task in (job, watcher):
            task.cancel()
        await asyncio.gather(job, watcher, return_exceptions=True)


async def wait_until_answering(address: str, config: LearnerWatchConfig) -> None:
    """Wait for a learner this run did not start to answer again (someone else restarts it)."""
    deadline = asyncio.get_running_loop().time() + config.recovery_timeout_s
    while not await answers(address, config.probe_timeout_s):
        if asyncio.get_running_loop().time() >= deadline:
            raise ServiceFailure(
                f"the learner at {address} did not answer again within {config.recovery_timeout_s:g}s",
                service="learner",
            )
        await asyncio.sleep(min(config.probe_interval_s, 2.0))
