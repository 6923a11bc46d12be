"""Deployments: rollout replicas serving a base model, hot-loadable to a named sampler snapshot.

A deployment is one or more rollout replicas, started here as `python -m rollout` processes (the serve
config's engine: vLLM where installed) or attached to running rollout services by address
(`anvilRolloutAddresses` in the create body). States: CREATING while replicas start, READY when all
serve, FAILED with a message otherwise.

Hot-load swaps every replica to snapshot `identity`: the snapshot is rebuilt and its digest verified
*before* any replica changes (a corrupted or mismatched snapshot is refused and the deployment keeps
serving the previous one, bit for bit), then each replica takes it with `LoadWeights`, atomically per
replica, under a new, higher version. If a replica fails midway, the ones already swapped are put back
on the previous snapshot. Progress is reported the way Fireworks' hot-load API does (`replicas[]` with
`current_snapshot_identity`, `readiness`, `loading_state.stage`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.launcher import ServiceProcess
from coordinator.services import start_rollout_process
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.errors import FailedPrecondition
from protos.status import call

log = logging.getLogger(__name__)


@dataclass
class Replica:
    address: str
    channel: grpc.aio.Channel
    stub: rollout_pb2_grpc.RolloutServiceStub
    version: int = 0
    process: ServiceProcess | None = None


@dataclass
class DeploymentRuntime:
    deployment_id: str
    model_dir: Path
    replicas: list[Replica] = field(default_factory=list)
    current_identity: str | None = None
    loading: dict[str, Any] = field(default_factory=lambda: {"stage": "idle"})
    _turn: itertools.count = field(default_factory=itertools.count)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    tokenizer: Any = None

    @classmethod
    async def start(
        cls,
        deployment_id: str,
        model_name: str,
        model_dir: Path,
        count: int,
        attach: list[str],
        engine: dict[str, Any],
        log_dir: Path,
        env: dict[str, str],
        api_key: str | None,
        timeout_s: float,
    ) -> DeploymentRuntime:
        runtime = cls(deployment_id, model_dir)
        try:
            if attach:
                for address in attach:
                    runtime._add(address, api_key, None)
            else:
                for index in range(count):
                    name = f"deployment-{deployment_id}-{index}"
                    process = await start_rollout_process(
                        name, model_name, model_dir, engine, log_dir, env, timeout_s, slot=index
                    )
                    runtime._add(process.address, api_key, process)
            for replica in runtime.replicas:
                info = await call(replica.stub.GetInfo(rollout_pb2.RolloutServiceGetInfoRequest()))
                replica.version = info.weight_version
            from transformers import AutoTokenizer

            runtime.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
        except BaseException:
            await runtime.stop()
            raise
        return runtime

    def _add(self, address: str, api_key: str | None, process: ServiceProcess | None) -> None:
        channel = open_channel(address, api_key=api_key)
        self.replicas.append(Replica(address, channel, rollout_pb2_grpc.RolloutServiceStub(channel), 0, process))

    def next_replica(self) -> Replica:
        return self.replicas[next(self._turn) % len(self.replicas)]

    async def hot_load(self, identity: str, snapshots: SnapshotStore, previous: str | None) -> None:
        """Serve snapshot `identity` on every replica, or leave everything as it was."""
        async with self._lock:
            self.loading = {"stage": "loading", "target_snapshot_identity": identity}
            try:
                if previous is not None and previous != self.current_identity:
                    raise FailedPrecondition(
                        f"delta hot-load of {identity!r} expects {previous!r} to be served, but the deployment "
                        f"serves {self.current_identity!r}; hot-load a base snapshot"
                    )
                directory = await asyncio.to_thread(snapshots.materialize, identity)
                fallback = (
                    await asyncio.to_thread(snapshots.materialize, self.current_identity)
                    if self.current_identity
                    else self.model_dir
                )
                swapped: list[Replica] = []
                try:
                    for replica in self.replicas:
                        await self._load(replica, directory)
                        swapped.append(replica)
                except BaseException:
                    for replica in swapped:
                        await self._load(replica, fallback)
                    raise
                self.current_identity = identity
                self.loading = {"stage": "done", "target_snapshot_identity": identity}
            except Exception as exc:
                log.warning("hot-load of %s into %s failed: %s", identity, self.deployment_id, exc)
                self.loading = {"stage": "error", "target_snapshot_identity": identity, "message": str(exc)}

    async def _load(self, replica: Replica, directory: Path) -> None:
        version = replica.version + 1
        await call(replica.stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(directory), version=version)))
        replica.version = version

    def status(self) -> dict[str, Any]:
        """Fireworks' hot-load GET body."""
        ready = self.loading.get("stage") != "loading"
        replica = {
            "readiness": ready,
            "current_snapshot_identity": self.current_identity,
            "loading_state": self.loading,
        }
        return {"replicas": [dict(replica, replica_id=str(i)) for i in range(len(self.replicas))]}

    async def stop(self) -> None:
        for replica in self.replicas:
            await replica.channel.close()
            if replica.process is not None:
                await asyncio.to_thread(replica.process.stop)
        self.replicas.clear()
