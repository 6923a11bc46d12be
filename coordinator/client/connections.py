"""What every client object of one ServiceClient shares: the event-loop thread, the learner channel and
the rollout replicas (a fleet ReplicaSet: health-checked, least-loaded routing, failover). Training and
sampling clients hold this, not the ServiceClient, so the three client classes form a one-way chain
(service -> training -> sampling) instead of importing each other."""

from __future__ import annotations

import asyncio

import grpc

from coordinator.client.runtime import Runtime
from coordinator.fleet.replica_set import ReplicaSet
from protos.channels import open_channel
from protos.errors import FailedPrecondition


class Connections:
    """Channels are created lazily, and only from coroutines on the runtime's loop."""

    def __init__(self, learner_address: str | None, rollout_addresses: list[str], api_key: str | None) -> None:
        self.learner_address = learner_address
        self.rollout_addresses = rollout_addresses
        self.api_key = api_key
        self.runtime = Runtime()
        self._learner_channel: grpc.aio.Channel | None = None
        self._replicas: ReplicaSet | None = None
        self._replicas_lock: asyncio.Lock | None = None

    def learner_channel(self) -> grpc.aio.Channel:
        if self.learner_address is None:
            raise FailedPrecondition("no learner address: pass learner_address= or set ANVIL_LEARNER_ADDRESS")
        if self._learner_channel is None:
            self._learner_channel = open_channel(self.learner_address, api_key=self.api_key)
        return self._learner_channel

    async def replicas(self) -> ReplicaSet:
        if not self.rollout_addresses:
            raise FailedPrecondition("no rollout address: pass rollout_addresses= or set ANVIL_ROLLOUT_ADDRESSES")
        self._replicas_lock = self._replicas_lock or asyncio.Lock()
        async with self._replicas_lock:
            if self._replicas is None:
                self._replicas = await ReplicaSet.connect(self.rollout_addresses, api_key=self.api_key)
        return self._replicas

    def close(self) -> None:
        async def close_channels() -> None:
            if self._learner_channel is not None:
                await self._learner_channel.close()
            if self._replicas is not None:
                await self._replicas.close()

        if self.runtime.loop.is_running():
            self.runtime.run(close_channels())
        self.runtime.close()
