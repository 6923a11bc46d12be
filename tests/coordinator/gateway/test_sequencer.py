"""OrderedExecutor on its own: order, buffering, retries at every stage, refusals, lost seq_ids."""

from __future__ import annotations

import asyncio

import pytest

from coordinator.gateway.futures import FutureStore
from coordinator.gateway.sequencer import OrderedExecutor
from protos.errors import InvalidArgument


async def test_order_buffering_and_retries_while_queued_running_and_done():
    futures = FutureStore()
    executor = OrderedExecutor(futures, gap_timeout_s=30)
    ran: list[int] = []
    release = asyncio.Event()

    def work(seq: int, gate: asyncio.Event | None = None):
        async def run():
            if gate is not None:
                await gate.wait()
            ran.append(seq)
            return seq * 10

        return run

    third = executor.submit(3, b"c", "t", work(3))
    second = executor.submit(2, b"b", "t", work(2))
    assert executor.submit(3, b"c", "t", work(3)) == third  # retried while buffered
    first = executor.submit(1, b"a", "t", work(1, release))
    await asyncio.sleep(0.05)
    assert ran == []  # seq 1 is running (blocked); 2 and 3 wait behind it
    assert executor.submit(1, b"a", "t", work(1)) == first  # retried while running
    release.set()
    outcomes = [await futures.wait(rid, 5) for rid in (first, second, third)]
    assert [o.value for o in outcomes] == [10, 20, 30] and ran == [1, 2, 3]
    assert executor.submit(2, b"b", "t", work(2)) == second and ran == [1, 2, 3]  # retried when done
    with pytest.raises(InvalidArgument, match="different request"):
        executor.submit(2, b"other", "t", work(2))
    await executor.close("test over")


async def test_a_failure_consumes_its_seq_id_and_a_missing_one_is_declared_lost():
    futures = FutureStore()
    executor = OrderedExecutor(futures, gap_timeout_s=0.2)

    async def fail():
        raise InvalidArgument("bad datum")

    async def ok():
        return "ok"

    failed = executor.submit(1, b"a", "t", fail)
    assert (await futures.wait(failed, 5)).error == "bad datum"
    after_gap = executor.submit(3, b"c", "t", ok)  # seq 2 never comes
    assert (await futures.wait(after_gap, 5)).value == "ok"
    late = executor.submit(2, b"b", "t", ok)
    outcome = await futures.wait(late, 5)
    assert outcome.category == "user" and "never arrived" in outcome.error
    await executor.close("test over")
