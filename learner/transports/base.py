"""WeightTransport: how a learner's weights, as version N, reach rollout replicas.

Every transport takes the same thing - a `WeightSource` (the backend: tensors by Hugging Face name, or
a Hugging Face directory written on demand) and the replica addresses - and returns one `ReplicaResult`
per replica, in order. Replicas are updated concurrently; one that fails does not stop the others, and its
result carries the error naming it (its own transaction guarantees it still serves its previous weights).
`raise_first_failure` turns the results into the all-or-nothing answer of a plain PublishWeights. New
transports (shared memory, relay fan-out, NCCL) subclass this and register in `learner.transports.TRANSPORTS`.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar

import grpc
import numpy as np
import torch

from protos.channels import open_channel
from protos.errors import AnvilError, Unavailable
from protos.status import error_from_rpc
from protos.weights_codec import DeltaBase, TensorBytes
from protos.weights_digest import tree_digest

T = TypeVar("T")


class WeightSource(Protocol):
    """What a transport reads the weights from (every learner backend is one)."""

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]: ...

    def save_weights(self, directory: Path) -> None: ...


@dataclass(frozen=True)
class ReplicaResult:
    address: str
    num_bytes: int
    """Bytes this transport sent to the replica (0 when it read them itself, e.g. from a shared disk)."""
    seconds: float
    error: AnvilError | None = None
    """Why this replica was not updated (None: it verified and serves the version)."""
    relayed: bool = False
    """It took the bytes from the replica before it in a relay chain (the learner sent it none)."""


def raise_first_failure(results: list[ReplicaResult]) -> None:
    for result in results:
        if result.error is not None:
            raise result.error


@dataclass
class PublishedWeights:
    """A session's own copy of the weights it last streamed to rollout, as version `base.version`: a
    replica that holds that version gets the next publication as lossless deltas from it."""

    base: DeltaBase | None = None

    def remember(self, version: int, snapshot: list[TensorBytes]) -> None:
        """Copy `snapshot` (its bytes may be the live parameters, which the next step changes)."""
        copies = {t.name: TensorBytes(t.name, t.dtype, t.shape, np.array(t.data, copy=True)) for t in snapshot}
        digest = tree_digest([(t.name, t.dtype, t.shape, t.data) for t in copies.values()])
        self.base = DeltaBase(version, copies, digest)


@dataclass(frozen=True)
class PublishContext:
    """Where a publication may write and how it authenticates to the replicas."""

    scratch_dir: Path
    """The session's directory for weight files (a transport that writes files keeps them here)."""
    base_model: str
    api_key: str | None
    target_timeout_s: float | None = None
    """How long one replica may take to take the weights; None: no limit."""
    published: PublishedWeights | None = None
    """The session's memory of what it last streamed (deltas are sent from it); None: always raw."""
    rewind: bool = False
    """Targets take the version even if they serve a newer one (PublishWeightsRequest.rewind)."""


class WeightTransport(ABC):
    name: ClassVar[str]

    def __init__(self, context: PublishContext) -> None:
        self.context = context

    @abstractmethod
    async def publish(self, version: int, source: WeightSource, targets: list[str]) -> list[ReplicaResult]:
        """Make every target serve `source`'s current weights as `version`; raise naming a failed target."""

    async def on_each_replica(
        self, targets: list[str], update: Callable[..., Awaitable[int]], pass_address: bool = False
    ) -> list[ReplicaResult]:
        """Run `update(channel)` (or `update(channel, address)` with `pass_address`), returning bytes sent,
        on a channel to every target at once; errors name the target."""

        async def one(address: str) -> ReplicaResult:
            start = time.perf_counter()
            async with open_channel(address, api_key=self.context.api_key) as channel:
                call = update(channel, address) if pass_address else update(channel)
                num_bytes, error = await self.attempt(address, call)
            return ReplicaResult(address, num_bytes or 0, time.perf_counter() - start, error)

        return list(await asyncio.gather(*(one(address) for address in targets)))

    async def attempt(self, address: str, call: Awaitable[T]) -> tuple[T | None, AnvilError | None]:
        """Await one call to the replica at `address` within the per-target timeout: (its value, None), or
        (None, an error naming the replica) when it failed or took too long."""
        try:
            return await asyncio.wait_for(call, self.context.target_timeout_s), None
        except TimeoutError:
            timeout = self.context.target_timeout_s
            return None, Unavailable(f"rollout {address} did not take the weights within {timeout:g}s")
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if isinstance(error, grpc.RpcError):
                return None, Unavailable(f"rollout {address} failed: {exc.code().name}: {exc.details()}")
            return None, type(error)(f"rollout {address}: {error}")
