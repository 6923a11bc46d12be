"""Exactly-once, in-order execution of one training model's requests, as Tinker's protocol demands.

Every TrainingClient request carries `seq_id` (1, 2, ...). Requests may arrive early (the SDK sends the
chunks of one forward_backward concurrently, chunk 1 last) or twice (a submit retried after a timeout,
with a fresh HTTP request but the same seq_id). So: an early request is buffered until its predecessors
ran; a retried one gets the request id of the first (it never runs twice, and never gets a 409, which
the SDK would retry); a seq_id reused for a different body is refused. If a predecessor never arrives
(a client died between reserving ids and sending), waiting requests would hang: after `gap_timeout_s`
the missing seq_id is declared lost (a late arrival gets that error) and execution moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from coordinator.gateway.futures import FutureStore, Outcome, outcome_of_error
from protos.errors import InvalidArgument

Work = Callable[[], Awaitable[Any]]


@dataclass(frozen=True)
class _Pending:
    fingerprint: bytes
    request_id: str
    work: Work


class OrderedExecutor:
    def __init__(self, futures: FutureStore, gap_timeout_s: float, first_seq_id: int = 1, remember: int = 4096):
        self.futures = futures
        self.gap_timeout_s = gap_timeout_s
        self.next_seq_id = first_seq_id
        self._pending: dict[int, _Pending] = {}
        self._seen: OrderedDict[int, tuple[bytes | None, str]] = OrderedDict()
        self._remember = remember
        self._wake = asyncio.Event()
        self._runner = asyncio.get_running_loop().create_task(self._run())

    def submit(self, seq_id: int, fingerprint: bytes, kind: str, work: Work) -> str:
        """Queue request `seq_id`; return its request id (the earlier one if this is a retry)."""
        known = self._seen.get(seq_id) or (
            (self._pending[seq_id].fingerprint, self._pending[seq_id].request_id) if seq_id in self._pending else None
        )
        if known is not None:
            seen_fingerprint, request_id = known
            if seen_fingerprint is not None and seen_fingerprint != fingerprint:
                raise InvalidArgument(
                    f"seq_id {seq_id} was already used by a different request; each request needs the next seq_id"
                )
            return request_id
        if seq_id < self.next_seq_id:
            raise InvalidArgument(
                f"seq_id {seq_id} is behind this model's sequence (next is {self.next_seq_id}) and is no longer "
                "remembered; requests must use increasing seq_ids"
            )
        request_id = self.futures.create(kind)
        self._pending[seq_id] = _Pending(fingerprint, request_id, work)
        self._wake.set()
        return request_id

    async def _run(self) -> None:
        while True:
            item = self._pending.pop(self.next_seq_id, None)
            if item is None:
                self._wake.clear()
                timeout = self.gap_timeout_s if self._pending else None
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except TimeoutError:
                    self._declare_lost(self.next_seq_id)
                continue
            # Seen from now on: a retry that arrives while this runs gets the same request id.
            self._remember_seen(self.next_seq_id, item.fingerprint, item.request_id)
            try:
                outcome = Outcome(value=await item.work())
            except Exception as exc:  # a failed request consumes its seq_id; the next one still runs
                outcome = outcome_of_error(exc)
            self.futures.resolve(item.request_id, outcome)
            self.next_seq_id += 1

    def _declare_lost(self, seq_id: int) -> None:
        waiting = min(self._pending)
        request_id = self.futures.create("lost")
        self.futures.resolve(
            request_id,
            Outcome(
                error=f"seq_id {seq_id} never arrived within {self.gap_timeout_s:g}s while seq_id {waiting} waited; "
                "it was skipped. Create a new training client if this one lost requests.",
                category="user",
            ),
        )
        self._remember_seen(seq_id, None, request_id)
        self.next_seq_id = seq_id + 1

    def _remember_seen(self, seq_id: int, fingerprint: bytes | None, request_id: str) -> None:
        self._seen[seq_id] = (fingerprint, request_id)
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)

    async def close(self, reason: str) -> None:
        """Stop executing; queued requests fail with `reason`."""
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner
        for item in self._pending.values():
            self.futures.resolve(item.request_id, Outcome(error=reason, category="user"))
        self._pending.clear()
