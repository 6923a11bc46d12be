"""ReplicaSet: the only list of rollout replicas, and the only way to reach them.

It keeps a channel per replica and the fleet's `FleetHealth` (states, versions, in-flight counts); it
probes every replica (GetInfo with a deadline) to move them between states; it routes each request to a
healthy replica (least in flight, sticky by session key) and fails it over to another one when the
replica is unreachable, too slow or declared dead mid-request; and it is the one place that publishes
weights to the fleet, so it knows who holds the current version and resyncs replicas that come back.
The RL loop, the Python client, the Tinker gateway and service-mode deployments all take replicas from
here; the supervisor (coordinator/fleet/supervisor.py) tells it about processes it restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from coordinator.fleet.calls import RolloutCalls
from coordinator.fleet.config import FleetConfig
from coordinator.fleet.health import FleetHealth, Replica, ReplicaState
from protos.anvil.v1 import learner_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.errors import AnvilError, DeadlineExceeded, Unavailable
from protos.status import being_cancelled, call
from servicekit.changes import Changes

logger = logging.getLogger(__name__)

T = TypeVar("T")
Stub = rollout_pb2_grpc.RolloutServiceStub
Publisher = Callable[..., Awaitable[learner_pb2.PublishWeightsResponse]]
"""`publisher(addresses, rewind=False)`: publishes the learner's current weights to the addresses with
partial_ok (the loop's session); `rewind` makes replicas take them even if they serve a newer version."""

_MOVABLE_CODES = {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}
"""Besides UNAVAILABLE and DEADLINE_EXCEEDED: what a killed server's streams end with."""


class _ReplicaLost(Exception):
    """The replica a request ran on was declared dead or removed while the request was in flight."""


class ReplicaSet(RolloutCalls):
    def __init__(self, config: FleetConfig | None = None, api_key: str | None = None) -> None:
        self.config = config or FleetConfig()
        self.api_key = api_key
        self.health = FleetHealth(self.config.failures_to_dead)
        self.publisher: Publisher | None = None
        """Set by whoever owns the learner session; stale replicas are resynced through it."""
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._running: dict[str, set[asyncio.Future]] = {}
        """Requests in flight per replica: cancelled (and retried elsewhere) when it is declared dead."""
        self._changed = Changes()
        self._publishing = asyncio.Lock()
        self._prober: asyncio.Task | None = None

    @classmethod
    async def connect(cls, addresses: list[str], config: FleetConfig | None = None, api_key: str | None = None):
        """A set of `replica-<i>` at `addresses`, probed once (so healthy ones take traffic at once), watched."""
        replicas = cls(config, api_key)
        for index, address in enumerate(addresses):
            replicas.add(f"replica-{index}", address)
        await replicas.probe()
        replicas.start()
        return replicas

    # --- membership ---------------------------------------------------------------------------------

    def add(self, name: str, address: str) -> Replica:
        replica = self.health.add(name, address)
        self._open(name, address)
        return replica

    async def remove(self, name: str) -> None:
        self.health.remove(name)
        self._lose(name)
        del self._running[name]
        await self._channels.pop(name).close()
        await self._notify()

    async def restarted(self, name: str, address: str) -> None:
        """The supervisor restarted `name`, now listening at `address`: stale until resynced."""
        old = self._channels.pop(name, None)
        self.health.restarted(name, address)
        self._open(name, address)
        if old is not None:
            await old.close()
        await self._notify()

    async def mark(self, name: str, state: ReplicaState) -> None:
        """The supervisor's view: DEAD (its process exited) or RESTARTING."""
        if state is ReplicaState.DEAD:
            self.health.died(name)
            self._lose(name)
        else:
            self.health.restarting(name)
        await self._notify()

    def _open(self, name: str, address: str) -> None:
        self._channels[name] = open_channel(address, api_key=self.api_key)
        self._running.setdefault(name, set())

    def _lose(self, name: str) -> None:
        for request in self._running.get(name, ()):
            request.cancel()

    @property
    def addresses(self) -> list[str]:
        return [replica.address for replica in self.health.replicas.values()]

    def stub(self, name: str) -> Stub:
        return rollout_pb2_grpc.RolloutServiceStub(self._channels[name])

    # --- health -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_forever())

    async def _probe_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            try:
                await self.probe()
                if self.publisher is not None and self.health.stale():
                    await self.publish(self.publisher, only_stale=True)
            except asyncio.CancelledError:
                if being_cancelled():
                    raise  # close() ends the watch
                # A gRPC call whose channel was closed under it raises CancelledError: not ours to obey.
                logger.warning("fleet probe round cut short by a closed channel")
            except Exception:  # a probe round must never end the watch
                logger.exception("fleet probe round failed")

    async def probe(self) -> None:
        """GetInfo on every replica that is not being restarted; update states from the answers."""
        names = [r.name for r in self.health.replicas.values() if r.state is not ReplicaState.RESTARTING]
        answers = await asyncio.gather(*(self._probe_one(name) for name in names))
        for name, version in zip(names, answers, strict=True):
            if name not in self.health.replicas:
                continue  # removed meanwhile
            if version is None:
                self.health.failed(name)
                if self.health.replicas[name].state is ReplicaState.DEAD:
                    self._lose(name)
            else:
                self.health.probe_succeeded(name, version)
        await self._notify()

    async def _probe_one(self, name: str) -> int | None:
        request = rollout_pb2.RolloutServiceGetInfoRequest()
        try:  # (a channel closed mid-probe - the replica restarted or was removed - is Unavailable too)
            info = await call(self.stub(name).GetInfo(request, timeout=self.config.probe_timeout_s))
        except (AnvilError, grpc.aio.AioRpcError, KeyError):
            return None
        return int(info.weight_version)

    async def _notify(self) -> None:
        self._changed.notify()

    def describe(self) -> str:
        return ", ".join(f"{r.name} {r.state.value} v{r.version}" for r in self.health.replicas.values()) or "none"

    # --- requests -----------------------------------------------------------------------------------

    async def call(
        self,
        invoke: Callable[[Stub, float], Awaitable[T]],
        session_key: str | None = None,
        tokens_of: Callable[[T], int] | None = None,
    ) -> T:
        """Run `invoke(stub, timeout)` on a healthy replica; on an unreachable, too slow or dead one, again on
        another. Waits (up to `no_replica_timeout_s`, saying why) while no replica is healthy. `tokens_of`
        counts the tokens of a reply, for the replica's tokens per second."""
        tried: set[str] = set()
        while True:
            replica = self.health.pick(session_key, exclude=tried)
            if replica is None:
                await self._wait_for_routable(exclude=tried)
                tried.clear()
                continue
            name = replica.name
            self.health.started(name)
            start, tokens = time.perf_counter(), 0
            try:
                reply = await self._race_loss(name, invoke(self.stub(name), self.config.request_timeout_s))
                tokens = tokens_of(reply) if tokens_of is not None else 0
                return reply
            except (Unavailable, DeadlineExceeded, _ReplicaLost, grpc.aio.AioRpcError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in _MOVABLE_CODES:
                    raise
                logger.warning("rollout %s failed a request (%s); moving it to another replica", name, exc)
                if not isinstance(exc, _ReplicaLost) and name in self.health.replicas:
                    self.health.failed(name)
                tried.add(name)
            finally:
                self.health.finished(name, tokens, time.perf_counter() - start)

    async def _race_loss(self, name: str, awaitable: Awaitable[T]) -> T:
        request = asyncio.ensure_future(call(awaitable))
        running = self._running[name]
        running.add(request)
        try:
            return await request
        except asyncio.CancelledError:
            if being_cancelled():
                raise  # the caller itself is being cancelled
            raise _ReplicaLost(f"{name} was declared dead") from None
        finally:
            running.discard(request)
            request.cancel()

    async def _wait_for_routable(self, exclude: set[str]) -> None:
        if self.health.routable():
            return  # every healthy replica failed this request once: they get another try
        timeout = self.config.no_replica_timeout_s
        # Every replica STALE is the fleet catching up with a publication (a resync follows at the next probe
        # round): routine, so not a warning. Anything else (suspect, dead, restarting) is worth one.
        resyncing = all(r.state is ReplicaState.STALE for r in self.health.replicas.values())
        log = logger.info if resyncing else logger.warning
        log("no healthy rollout replica (%s); waiting up to %gs for one", self.describe(), timeout)
        if not await self._changed.wait_until(lambda: bool(self.health.routable()), timeout):
            raise Unavailable(
                f"no healthy rollout replica for {timeout:g}s ({self.describe()}); restart a replica or add one"
            )

    # --- weights ------------------------------------------------------------------------------------

    async def publish(
        self, publisher: Publisher, only_stale: bool = False, rewind: bool = False, version: int | None = None
    ) -> learner_pb2.PublishWeightsResponse | None:
        """Publish the learner's current weights to every reachable replica (or only the stale ones) and
        record who took them; the fleet's version becomes the published one. `rewind`: the learner went
        back to an earlier checkpoint, and replicas serving newer weights take these anyway. `version`: the
        learner's version, so the fleet moves on to it even when no replica can take it now (every one
        suspect): a replica that answers again later is then STALE and resynced, never served as current."""
        async with self._publishing:
            wanted = (ReplicaState.STALE,) if only_stale else (ReplicaState.HEALTHY, ReplicaState.STALE)
            # Only replicas that answered their last probe: one that stopped answering would hold the
            # learner until the publication's per-target timeout.
            targets = [r for r in self.health.replicas.values() if r.state in wanted and r.failures == 0]
            if not targets:
                if version is not None and not only_stale:
                    self.health.published(version, succeeded=[], rewind=rewind)
                    await self._notify()
                return None
            rewind = rewind or any(self.health.diverged(r.version) for r in targets)
            reply = await publisher([r.address for r in targets], rewind=rewind)
            outcome = dict(zip((r.name for r in targets), reply.targets, strict=True))
            succeeded = [name for name, result in outcome.items() if result.ok]
            for name, result in outcome.items():
                if result.ok:
                    continue
                # A replica that refused because it already serves this version or a newer one holds it
                # (a resync and a step's publication can cross); anything else leaves it stale.
                served = await self._probe_one(name)
                if served is not None and served >= reply.version and not rewind:
                    succeeded.append(name)
                else:
                    logger.warning("weights v%d did not reach %s: %s", reply.version, name, result.error)
            failed = [name for name in outcome if name not in succeeded]
            self.health.published(reply.version, succeeded, failed=failed, rewind=rewind)
        await self._notify()
        return reply

    def metrics(self) -> dict[str, float]:
        codes = {state: index for index, state in enumerate(ReplicaState)}
        metrics: dict[str, float] = {"fleet/healthy": float(len(self.health.routable()))}
        for replica in self.health.replicas.values():
            prefix = f"fleet/{replica.name}"
            metrics[f"{prefix}/state"] = float(codes[replica.state])
            metrics[f"{prefix}/version"] = float(replica.version)
            metrics[f"{prefix}/in_flight"] = float(replica.in_flight)
            metrics[f"{prefix}/tokens_per_s"] = replica.tokens_per_s
            metrics[f"{prefix}/restarts"] = float(replica.restarts)
        return metrics

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
        for channel in self._channels.values():
            await channel.close()
