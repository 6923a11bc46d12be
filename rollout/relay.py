"""Weight relay: a replica forwards the PushWeights stream it receives to the next replica of a chain.

The learner streams the weights once, to the head of the chain; each replica stages every request it
receives and, before staging it, hands its raw bytes (the wire message, not re-encoded) to a
`RelayForward` that streams them on to the next replica, which does the same for the rest of the chain.
So the transfer is pipelined: replica k starts receiving as soon as replica k-1 has the first chunk.
Each replica verifies the digest itself at CommitWeightUpdate (the learner sends each one the digest).

A relay never fails its own replica's staging: a next replica that errors, or stalls for longer than
`stall_s` (its flow control stops taking bytes: a stopped process), ends the forwarding; the upstream
stream goes on, and the results say which replicas down the chain did not get the whole stream, so the
learner sends to those directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from protos.anvil.v1 import rollout_pb2
from protos.channels import open_channel
from protos.weights_relay import PUSH_METHOD, relay_metadata

logger = logging.getLogger(__name__)

QUEUED_REQUESTS = 8
"""Requests (4 MiB chunks) held between receiving and forwarding: enough to ride out jitter."""


class RelayForward:
    """Streams raw PushWeights requests on to `chain[0]`, naming `chain[1:]` for it to relay to."""

    def __init__(self, chain: list[str], stall_s: float, api_key: str | None) -> None:
        self.chain = chain
        self.stall_s = stall_s
        self.api_key = api_key
        self.error: str | None = None
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUED_REQUESTS)
        self._task = asyncio.ensure_future(self._forward())

    async def offer(self, raw: bytes) -> None:
        """Queue one request for the next replica; gives up on the relay (not the caller) if it fails or stalls."""
        if self.error is None:
            await self._enqueue(raw)

    async def finish(self) -> list[rollout_pb2.RelayResult]:
        """End the stream to the next replica and collect every result down the chain."""
        if self.error is None and await self._enqueue(None):
            try:
                return await self._task
            except Exception:
                self._note_failure()
        return self._failed_results()

    async def _enqueue(self, item: bytes | None) -> bool:
        if not self._queue.full() and not self._task.done():
            self._queue.put_nowait(item)
            return True
        put = asyncio.ensure_future(self._queue.put(item))
        done, _ = await asyncio.wait({put, self._task}, timeout=self.stall_s, return_when=asyncio.FIRST_COMPLETED)
        if put in done:
            return True
        put.cancel()
        if self._task.done():
            self._note_failure()
        else:
            self.error = f"rollout {self.chain[0]} took no relayed bytes for {self.stall_s:g}s"
            logger.warning("%s; abandoning the relay", self.error)
            self._task.cancel()
        return False

    async def cancel(self) -> None:
        """The upstream stream failed: cut the downstream one too, so its staging is discarded."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task

    async def _requests(self) -> AsyncIterator[bytes]:
        while (raw := await self._queue.get()) is not None:
            yield raw

    async def _forward(self) -> list[rollout_pb2.RelayResult]:
        nearest, rest = self.chain[0], self.chain[1:]
        async with open_channel(nearest, api_key=self.api_key) as channel:
            push = channel.stream_unary(
                PUSH_METHOD,
                request_serializer=None,  # already wire bytes
                response_deserializer=rollout_pb2.PushWeightsResponse.FromString,
            )
            metadata = relay_metadata(rest, self.stall_s) if rest else None
            response = await push(self._requests(), metadata=metadata)
        mine = rollout_pb2.RelayResult(address=nearest, ok=True, num_bytes=response.num_bytes, reached=True)
        return [mine, *response.relayed]

    def _note_failure(self) -> None:
        exc = self._task.exception() if self._task.done() and not self._task.cancelled() else None
        detail = getattr(exc, "details", None)
        reason = detail() if callable(detail) else str(exc or "cancelled")
        code = getattr(exc, "code", None)
        prefix = f"{code().name}: " if callable(code) else ""
        self.error = f"relay to rollout {self.chain[0]} failed: {prefix}{reason}"
        logger.warning("%s", self.error)

    def _failed_results(self) -> list[rollout_pb2.RelayResult]:
        nearest, rest = self.chain[0], self.chain[1:]
        results = [rollout_pb2.RelayResult(address=nearest, ok=False, error=self.error or "relay failed", reached=True)]
        behind = f"not reached: the relay through {nearest} failed"
        return results + [rollout_pb2.RelayResult(address=address, ok=False, error=behind) for address in rest]
