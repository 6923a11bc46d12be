"""Per-session request ordering and idempotency (Tinker's seq_id rules).

Each training request carries a seq_id, starting at 1. `RequestSequencer.run` executes requests
strictly in seq_id order whatever order they arrive in, one at a time. A request whose seq_id already
ran gets the first outcome back (result or error) without executing again - so a retried OptimStep
never steps twice. A request that waits longer than `gap_timeout_s` for an earlier seq_id fails with
DEADLINE_EXCEEDED naming the missing id, instead of hanging. A rejected request still consumes its
seq_id: clients move on to the next id after an error, as Tinker's do.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from protos.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument


class RequestSequencer:
    def __init__(self, gap_timeout_s: float, cache_size: int) -> None:
        self._gap_timeout_s = gap_timeout_s
        self._cache_size = cache_size
        self._next_seq_id = 1
        self._turn = asyncio.Condition()
        self._in_flight: dict[int, tuple[bytes, asyncio.Future]] = {}
        self._done: OrderedDict[int, tuple[bytes, asyncio.Future]] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    @property
    def next_seq_id(self) -> int:
        return self._next_seq_id

    async def run(self, seq_id: int, fingerprint: bytes, execute: Callable[[], Awaitable[Any]]) -> Any:
        """Run `execute` as request `seq_id` (identified by `fingerprint`), in order, at most once."""
        if seq_id < 1:
            raise InvalidArgument(f"seq_id must be >= 1 (the first request of a session is 1), got {seq_id}")
        known = self._done.get(seq_id) or self._in_flight.get(seq_id)
        if known is not None:
            if known[0] != fingerprint:
                raise InvalidArgument(
                    f"seq_id {seq_id} was already used for a different request; use seq_id >= {self._next_seq_id}"
                )
            return await asyncio.shield(known[1])
        if seq_id < self._next_seq_id:
            raise FailedPrecondition(
                f"seq_id {seq_id} already executed and its result is no longer cached; next seq_id is "
                f"{self._next_seq_id}"
            )
        outcome: asyncio.Future = asyncio.get_running_loop().create_future()
        outcome.add_done_callback(_mark_retrieved)
        self._in_flight[seq_id] = (fingerprint, outcome)
        # The request runs in its own task: a caller that disconnects does not abort a half-done step,
        # and a retry of the same seq_id awaits the same outcome.
        task = asyncio.create_task(self._drive(seq_id, fingerprint, outcome, execute))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(outcome)

    async def _drive(
        self, seq_id: int, fingerprint: bytes, outcome: asyncio.Future, execute: Callable[[], Awaitable[Any]]
    ) -> None:
        try:
            async with self._turn:
                await asyncio.wait_for(
                    self._turn.wait_for(lambda: self._next_seq_id == seq_id), timeout=self._gap_timeout_s
                )
        except TimeoutError:
            del self._in_flight[seq_id]
            outcome.set_exception(
                DeadlineExceeded(
                    f"seq_id {seq_id} waited {self._gap_timeout_s:g}s for seq_id {self._next_seq_id}, which never "
                    "arrived; send the missing request (requests run strictly in seq_id order)"
                )
            )
            return
        try:
            outcome.set_result(await execute())
        except Exception as exc:  # user errors and bugs alike consume the id, so later requests never hang
            outcome.set_exception(exc)
        finally:
            del self._in_flight[seq_id]
            self._done[seq_id] = (fingerprint, outcome)
            while len(self._done) > self._cache_size:
                self._done.popitem(last=False)
            async with self._turn:
                self._next_seq_id = seq_id + 1
                self._turn.notify_all()


def _mark_retrieved(future: asyncio.Future) -> None:
    """Outcomes nobody awaits any more (the caller left) must not log 'exception never retrieved'."""
    if not future.cancelled():
        future.exception()
