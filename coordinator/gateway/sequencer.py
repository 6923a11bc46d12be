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

    def submit(self, seq_id: int, fingerprint: bytes, kind: str, work: Work) -> str:
        """Queue request `seq_id`; return its request id (the earlier one if this is a retry)."""
        return self._sequencer.submit(seq_id, fingerprint, work, kind).label

    def _track(self, ticket: Ticket) -> None:
        ticket.label = request_id = self.futures.create(ticket.kind)

        def resolve(outcome: asyncio.Future) -> None:
            if not outcome.cancelled():
                error = outcome.exception()
                self.futures.resolve(request_id, outcome_of_error(error) if error else Outcome(value=outcome.result()))

        ticket.outcome.add_done_callback(resolve)

    async def close(self, reason: str) -> None:
        """Stop executing; queued requests fail with `reason`."""
        await self._sequencer.close(FailedPrecondition(reason))
