"""Which weights each rollout replica serves, so every sample comes from the snapshot its sampling
session is bound to.

Tinker lets many sampling clients coexist: the base model, named sampler checkpoints, and the unnamed
snapshot of each `save_weights_and_get_sampling_client`. A rollout replica serves one set of weights at
a time, so the router admits a request onto a replica that has its snapshot loaded; otherwise it drains
a replica (no new requests for its current snapshot; running ones finish) and hot-loads the wanted
snapshot with `LoadWeights` (atomic on the replica: a sample never mixes weights). Load versions are
the router's own increasing counter, since the rollout's versions only increase.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.errors import NotFound
from protos.status import call


@dataclass
class _Replica:
    address: str
    stub: rollout_pb2_grpc.RolloutServiceStub
    channel: object
    version: int = 0
    loaded: Path | None = None
    inflight: int = 0
    draining: bool = False
    swapping: bool = False


class SnapshotRouter:
    def __init__(self, addresses: list[str], api_key: str | None, base: Path) -> None:
        self.base = base
        self._replicas = []
        for address in addresses:
            channel = open_channel(address, api_key=api_key)
            self._replicas.append(_Replica(address, rollout_pb2_grpc.RolloutServiceStub(channel), channel))
        self._changed = asyncio.Condition()
        self.loads = 0

    async def start(self) -> None:
        """Learn each replica's version; a replica still at version 0 serves the base model."""
        for replica in self._replicas:
            info = await call(replica.stub.GetInfo(rollout_pb2.RolloutServiceGetInfoRequest()))
            replica.version = info.weight_version
            replica.loaded = self.base if info.weight_version == 0 else None

    @contextlib.asynccontextmanager
    async def serving(self, snapshot: Path) -> AsyncIterator[rollout_pb2_grpc.RolloutServiceStub]:
        """A replica stub serving `snapshot` for the duration of the block."""
        replica = await self._acquire(snapshot)
        try:
            yield replica.stub
        finally:
            async with self._changed:
                replica.inflight -= 1
                self._changed.notify_all()

    async def _acquire(self, snapshot: Path) -> _Replica:
        async with self._changed:
            while True:
                ready = [r for r in self._replicas if r.loaded == snapshot and not r.draining and not r.swapping]
                if ready:
                    replica = min(ready, key=lambda r: r.inflight)
                    replica.inflight += 1
                    return replica
                if any(r.loaded == snapshot or r.swapping for r in self._replicas):
                    await self._changed.wait()  # it is (being) loaded somewhere: wait for it to be ready
                    continue
                idle = [r for r in self._replicas if r.inflight == 0]
                if idle:
                    replica = idle[0]
                    replica.swapping, replica.draining = True, False
                    break
                min(self._replicas, key=lambda r: r.inflight).draining = True
                await self._changed.wait()
        try:
            if not snapshot.is_dir():
                raise NotFound(f"the weights of this sampling client ({snapshot}) no longer exist")
            version = replica.version + 1
            await call(replica.stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(snapshot), version=version)))
            self.loads += 1
        except BaseException:
            async with self._changed:
                replica.swapping = False
                self._changed.notify_all()
            raise
        async with self._changed:
            replica.version, replica.loaded, replica.swapping = version, snapshot, False
            replica.inflight += 1
            self._changed.notify_all()
        return replica

    async def close(self) -> None:
        for replica in self._replicas:
            await replica.channel.close()
