"""Deployments: rollout replicas serving a base model, hot-loadable to a named sampler snapshot.

A deployment is one or more rollout replicas, started here as `python -m rollout` processes (the serve
config's engine: vLLM where installed) or attached to running rollout services by address
(`anvilRolloutAddresses` in the create body). States: CREATING while replicas start, READY when all
serve, FAILED with a message otherwise.

Its replicas are a fleet `ReplicaSet` like the RL loop's and the gateway's: probed, routed least in
flight, a completion failed over when its replica dies; replicas started here are supervised and
restarted. A hot-load is a publication to that fleet: the snapshot is rebuilt and its digest verified
*before* any replica changes (a corrupted or mismatched snapshot is refused and the deployment keeps
serving the previous one, bit for bit), then every reachable replica takes it with `LoadWeights`,
atomically per replica, under the fleet's next version. The deployment serves the new snapshot once
one replica holds it; a replica that missed it (or was restarted, and so serves the base model) is
STALE, gets no traffic, and is resynced to the served snapshot by the fleet's probe loop. Progress is
reported the way Fireworks' hot-load API does (`replicas[]` with `current_snapshot_identity`,
`readiness`, `loading_state.stage`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coordinator.fleet.config import FleetConfig
from coordinator.fleet.health import ReplicaState
from coordinator.fleet.replica_set import Publisher, ReplicaSet
from coordinator.fleet.supervisor import ReplicaSupervisor
from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.launcher import ServiceProcess
from coordinator.services import start_rollout_process
from protos.anvil.v1 import learner_pb2, rollout_pb2
from protos.errors import AnvilError, FailedPrecondition, Unavailable
from protos.status import call

log = logging.getLogger(__name__)


@dataclass
class DeploymentRuntime:
    deployment_id: str
    model_dir: Path
    replicas: ReplicaSet
    supervisor: ReplicaSupervisor | None = None
    current_identity: str | None = None
    served: Path | None = None
    """The directory every replica should serve (None: the base model it started with)."""
    identities: dict[int, str | None] = field(default_factory=lambda: {0: None})
    """Which snapshot each fleet weight version is, for the per-replica status."""
    loading: dict[str, Any] = field(default_factory=lambda: {"stage": "idle"})
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
        fleet: FleetConfig | None = None,
    ) -> DeploymentRuntime:
        fleet = fleet or FleetConfig()
        runtime = cls(deployment_id, model_dir, ReplicaSet(fleet, api_key=api_key))
        runtime.replicas.publisher = runtime._resync
        processes: dict[str, ServiceProcess] = {}

        async def start_replica(name: str) -> ServiceProcess:
            index = int(name.rsplit("-", 1)[1])
            process_name = f"deployment-{deployment_id}-{index}"
            return await start_rollout_process(
                process_name, model_name, model_dir, engine, log_dir, env, timeout_s, slot=index
            )

        try:
            if attach:
                for index, address in enumerate(attach):
                    runtime.replicas.add(f"replica-{index}", address)
            else:
                for index in range(count):
                    name = f"replica-{index}"
                    processes[name] = process = await start_replica(name)
                    runtime.replicas.add(name, process.address)
            await runtime.replicas.probe()
            if not runtime.replicas.health.routable():
                described = runtime.replicas.describe()
                raise Unavailable(f"no replica of deployment {deployment_id!r} answered ({described})")
            # Attached replicas may already serve a later version than the fleet's 0: start from the highest.
            # (the ones behind it are STALE and resynced to the base model at that version).
            highest = max(r.version for r in runtime.replicas.health.replicas.values())
            runtime.replicas.health.published(highest, succeeded=[])
            runtime.identities = {highest: None}
            runtime.replicas.start()
            if processes:
                runtime.supervisor = ReplicaSupervisor(runtime.replicas, fleet, start_replica)
                for name, process in processes.items():
                    runtime.supervisor.watch(name, process)
            from transformers import AutoTokenizer

            runtime.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
        except BaseException:
            await runtime.stop()
            for process in processes.values():
                await asyncio.to_thread(process.stop)
            raise
        return runtime

    # --- weights ------------------------------------------------------------------------------------

    def _loader(self, directory: Path, version: int) -> Publisher:
        """A fleet publisher that hot-loads `directory` as `version` on the replicas it is given."""

        async def load(addresses: list[str], rewind: bool = False) -> learner_pb2.PublishWeightsResponse:
            names = {r.address: r.name for r in self.replicas.health.replicas.values()}
            request = rollout_pb2.LoadWeightsRequest(path=str(directory), version=version, rewind=rewind)

            async def load_one(address: str) -> learner_pb2.PublishTargetResult:
                stub = self.replicas.stub(names[address])
                try:
                    await call(stub.LoadWeights(request, timeout=self.replicas.config.publish_timeout_s))
                except (AnvilError, grpc.aio.AioRpcError) as exc:
                    return learner_pb2.PublishTargetResult(address=address, ok=False, error=str(exc))
                return learner_pb2.PublishTargetResult(address=address, ok=True)

            targets = await asyncio.gather(*(load_one(address) for address in addresses))
            return learner_pb2.PublishWeightsResponse(version=version, targets=targets)

        return load

    async def _resync(self, addresses: list[str], rewind: bool = False) -> learner_pb2.PublishWeightsResponse:
        """The fleet's resync of replicas that came back: the served snapshot under the fleet's version."""
        return await self._loader(self.served or self.model_dir, self.replicas.health.version)(addresses, rewind)

    async def hot_load(self, identity: str, snapshots: SnapshotStore, previous: str | None) -> None:
        """Serve snapshot `identity` on the deployment's replicas, or leave everything as it was."""
        async with self._lock:
            self.loading = {"stage": "loading", "target_snapshot_identity": identity}
            try:
                if previous is not None and previous != self.current_identity:
                    raise FailedPrecondition(
                        f"delta hot-load of {identity!r} expects {previous!r} to be served, but the deployment "
                        f"serves {self.current_identity!r}; hot-load a base snapshot"
                    )
                directory = await asyncio.to_thread(snapshots.materialize, identity)
                health = self.replicas.health
                version = max(health.version, *(r.version for r in health.replicas.values())) + 1
                self.identities[version] = identity
                reply = await self.replicas.publish(self._loader(directory, version))
                if reply is None or not any(target.ok for target in reply.targets):
                    errors = "; ".join(t.error for t in reply.targets) if reply is not None else "none reachable"
                    raise Unavailable(f"no replica of the deployment took the snapshot ({errors})")
                self.current_identity, self.served = identity, directory
                self.loading = {"stage": "done", "target_snapshot_identity": identity}
            except Exception as exc:
                log.warning("hot-load of %s into %s failed: %s", identity, self.deployment_id, exc)
                self.loading = {"stage": "error", "target_snapshot_identity": identity, "message": str(exc)}

    def status(self) -> dict[str, Any]:
        """Fireworks' hot-load GET body: one entry per replica, with the snapshot it serves."""
        loading = self.loading.get("stage") == "loading"
        return {
            "replicas": [
                {
                    "replica_id": replica.name.rsplit("-", 1)[1],
                    "readiness": replica.state is ReplicaState.HEALTHY and not loading,
                    "current_snapshot_identity": self.identities.get(replica.version),
                    "loading_state": self.loading,
                    "anvil_state": replica.state.value,
                }
                for replica in self.replicas.health.replicas.values()
            ]
        }

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.close()
            for process in self.supervisor.processes.values():
                await asyncio.to_thread(process.stop)
            self.supervisor = None
        await self.replicas.close()
