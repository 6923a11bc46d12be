"""Exactly-once, in-order execution of one training model's REST requests, on the shared sequencer core.

`servicekit.sequencer.Sequencer` does the ordering, retries and gaps (with `SKIP_MISSING`: a REST client
cannot resend a seq_id, so one that never arrives is declared lost and execution moves on). This adapter
gives each request a Tinker request id in the `FutureStore` when it is first seen - a retry gets the
same id, never a 409, which the SDK would retry - and resolves that future with the request's outcome.
"""

from __future__ import annotations

import asyncio

from coordinator.gateway.futures import FutureStore, Outcome, outcome_of_error
from protos.errors import FailedPrecondition
from servicekit.sequencer import GapPolicy, Sequencer, Ticket, Work


class OrderedExecutor:
    def __init__(self, futures: FutureStore, gap_timeout_s: float, remember: int = 4096) -> None:
        self.futures = futures
        self._sequencer = Sequencer(gap_timeout_s, remember, GapPolicy.SKIP_MISSING, on_new_ticket=self._track)

    @property
    def next_seq_id(self) -> int:
        return self._sequencer.next_seq_id

    def submit(self, seq_id: int, fingerprint: bytes, kind: str, work: Work, request_id: str | None = None) -> str:
        """Queue request `seq_id`; return its request id (the earlier one if this is a retry). `request_id`:
        the id it was given before a restart, when it is run again after one."""
        return self._sequencer.submit(seq_id, fingerprint, work, kind, label=request_id).label

    def knows(self, seq_id: int) -> bool:
        """Whether `seq_id` is queued, running or remembered (a submit of it would be a retry)."""
        return self._sequencer.knows(seq_id)

    def restore_finished(self, seq_id: int, fingerprint: bytes | None, kind: str, request_id: str) -> None:
        """`seq_id` ran before a restart as `request_id` (its outcome is in the FutureStore)."""
        self._sequencer.restore_finished(seq_id, fingerprint, kind, request_id)

    def _track(self, ticket: Ticket) -> None:
        if ticket.label is None:
            ticket.label = self.futures.create(ticket.kind)
        request_id = ticket.label

        def resolve(outcome: asyncio.Future) -> None:
            if not outcome.cancelled():
                error = outcome.exception()
                self.futures.resolve(request_id, outcome_of_error(error) if error else Outcome(value=outcome.result()))

        ticket.outcome.add_done_callback(resolve)

    async def close(self, reason: str) -> None:
        """Stop executing; queued requests fail with `reason`."""
        await self._sequencer.close(FailedPrecondition(reason))
