"""The seq-id sequencer core on its own: both gap policies, retries at every stage, close."""

from __future__ import annotations

import asyncio

import pytest

from protos.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from servicekit.sequencer import GapPolicy, Sequencer


def returning(value, ran: list, gate: asyncio.Event | None = None):
    async def work():
        if gate is not None:
            await gate.wait()
        ran.append(value)
        return value

    return work


async def test_fail_waiting_fails_only_requests_that_waited_the_timeout_and_keeps_the_gap_open():
    sequencer = Sequencer(0.3, 16, GapPolicy.FAIL_WAITING)
    ran: list = []
    early = sequencer.submit(3, b"c", returning(3, ran))
    await asyncio.sleep(0.2)
    later = sequencer.submit(2, b"b", returning(2, ran))  # arrives 0.2 s after seq 3
    with pytest.raises(DeadlineExceeded, match=r"seq_id 3 waited 0\.3s for seq_id 1"):
        await early.outcome
    assert not later.outcome.done(), "seq 2 has waited only ~0.1 s"
    with pytest.raises(DeadlineExceeded, match="seq_id 2 waited"):
        await later.outcome
    # Nothing was skipped: the missing id still runs, then the failed ones can be sent again.
    assert await sequencer.run(1, b"a", returning(1, ran)) == 1
    assert await sequencer.run(2, b"b", returning(2, ran)) == 2
    assert ran == [1, 2]
    await sequencer.close(FailedPrecondition("over"))


async def test_skip_missing_declares_the_gap_lost_and_goes_on():
    sequencer = Sequencer(0.2, 16, GapPolicy.SKIP_MISSING)
    ran: list = []
    assert await sequencer.run(1, b"a", returning(1, ran)) == 1
    assert await sequencer.run(3, b"c", returning(3, ran)) == 3  # seq 2 never comes
    with pytest.raises(InvalidArgument, match="seq_id 2 never arrived"):
        await sequencer.run(2, b"b", returning(2, ran))
    assert ran == [1, 3]
    await sequencer.close(FailedPrecondition("over"))


async def test_retries_share_one_execution_and_forgotten_ids_are_refused():
    sequencer = Sequencer(30, 2, GapPolicy.FAIL_WAITING)
    ran: list = []
    gate = asyncio.Event()
    first = sequencer.submit(1, b"a", returning("one", ran, gate))
    await asyncio.sleep(0.05)
    assert sequencer.submit(1, b"a", returning("again", ran)) is first  # retried while running
    gate.set()
    assert await first.outcome == "one"
    assert await sequencer.run(1, b"a", returning("again", ran)) == "one"  # retried when done
    with pytest.raises(InvalidArgument, match="already used for a different request"):
        sequencer.submit(1, b"other", returning("x", ran))
    for seq_id in (2, 3):
        await sequencer.run(seq_id, bytes([seq_id]), returning(seq_id, ran))
    with pytest.raises(FailedPrecondition, match="no longer remembered"):  # remember=2 keeps 2 and 3 only
        sequencer.submit(1, b"a", returning("x", ran))
    assert ran == ["one", 2, 3]
    with pytest.raises(InvalidArgument, match="must be >= 1"):
        sequencer.submit(0, b"z", returning("x", ran))
    await sequencer.close(FailedPrecondition("over"))


async def test_close_fails_the_running_and_waiting_requests_and_later_submits():
    sequencer = Sequencer(30, 16, GapPolicy.SKIP_MISSING)
    running = sequencer.submit(1, b"a", returning(1, [], asyncio.Event()))  # never released
    waiting = sequencer.submit(2, b"b", returning(2, []))
    await asyncio.sleep(0.05)
    await sequencer.close(FailedPrecondition("the session was closed"))
    for ticket in (running, waiting):
        with pytest.raises(FailedPrecondition, match="closed"):
            await ticket.outcome
    with pytest.raises(FailedPrecondition, match="closed"):
        sequencer.submit(3, b"c", returning(3, []))
