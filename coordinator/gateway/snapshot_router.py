"""Which weights each rollout replica serves, so every sample comes from the snapshot its sampling
session is bound to; on the fleet's ReplicaSet, so only healthy replicas are used and a sample that
fails on one replica (killed, hung, unreachable) runs again on another.

Tinker lets many sampling clients coexist: the base model, named sampler checkpoints, and the unnamed
snapshot of each `save_weights_and_get_sampling_client`. A rollout replica serves one set of weights at
a time, so the router admits a request onto a replica that has its snapshot loaded; otherwise it drains
a replica (no new requests for its current snapshot; running ones finish) and hot-loads the wanted
snapshot with `LoadWeights` (atomic on the replica: a sample never mixes weights). Load versions are
the router's own increasing counter per replica, since the rollout's versions only increase. A replica
that was restarted serves the base model again.

A snapshot in demand spreads: when a request for it finds every replica serving it busy, an idle replica
whose own snapshot nobody asked for in the last `SPREAD_QUIET_S` loads it too (in the background; the
request runs where the snapshot already is). So a Tinker RL loop, which samples a burst from each new
snapshot, uses the whole fleet; two snapshots in use at once keep their own replicas instead of thrashing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from coordinator.fleet.replica_set import ReplicaSet
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.errors import DeadlineExceeded, NotFound, Unavailable
from protos.status import call
from servicekit.changes import Changes

logger = logging.getLogger(__name__)
T = TypeVar("T")

SPREAD_QUIET_S = 2.0
"""A replica whose snapshot had no request for this long may be taken over by a busier snapshot."""


class _LoadFailed(Exception):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass
class _Serving:
    version: int = 0
    loaded: Path | None = None
    inflight: int = 0
    draining: bool = False
    swapping: bool = False
    restarts: int = 0


class SnapshotRouter:
    def __init__(self, replicas: ReplicaSet, base: Path) -> None:
        self.replicas = replicas
        self.base = base
        self._serving: dict[str, _Serving] = {}
        self._changed = Changes()
        self._waiting: Counter[Path] = Counter()
        """Requests waiting in _acquire, per snapshot."""
        self._last_wanted: dict[Path, float] = {}
        self._spreading: set[asyncio.Task] = set()
        self.loads = 0

    async def start(self) -> None:
        """Learn each replica's version; a replica still at version 0 serves the base model."""
        for replica in self.replicas.health.replicas.values():
            self._serving[replica.name] = _Serving(max(replica.version, 0), self.base if replica.version <= 0 else None)

    def _state(self, name: str) -> _Serving:
        replica = self.replicas.health.replicas[name]
        state = self._serving.setdefault(name, _Serving(loaded=self.base, restarts=replica.restarts))
        if state.restarts != replica.restarts:  # restarted: a fresh process serves the base weights
            self._serving[name] = state = _Serving(loaded=self.base, restarts=replica.restarts)
        return state

    async def run(self, snapshot: Path, invoke: Callable[[rollout_pb2_grpc.RolloutServiceStub], Awaitable[T]]) -> T:
        """`invoke(stub)` on a healthy replica serving `snapshot`; again on another if that replica fails."""
        failed: set[str] = set()
        while True:
            try:
                name = await self._acquire(snapshot, failed)
            except _LoadFailed as exc:
                logger.warning("rollout %s failed to load a snapshot (%s); trying another replica", exc.name, exc)
                self.replicas.health.failed(exc.name)
                failed.add(exc.name)
                continue
            try:
                return await call(invoke(self.replicas.stub(name)))
            except (Unavailable, DeadlineExceeded, grpc.aio.AioRpcError) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in (
                    grpc.StatusCode.CANCELLED,
                    grpc.StatusCode.UNKNOWN,
                ):
                    raise
                logger.warning("rollout %s failed a sample (%s); moving it to another replica", name, exc)
                self.replicas.health.failed(name)
                failed.add(name)
            finally:
                if name in self.replicas.health.replicas:  # (not removed meanwhile)
                    self._state(name).inflight -= 1
                self._changed.notify()

    def _candidates(self, failed: set[str]) -> list[str]:
        names = [r.name for r in self.replicas.health.routable() if r.name not in failed]
        if not names and failed:
            failed.clear()
            names = [r.name for r in self.replicas.health.routable()]
        return names

    async def _acquire(self, snapshot: Path, failed: set[str]) -> str:
        """A replica to run on for `snapshot`: one serving it (least in flight), or an idle one to load it
        onto, or - all busy - one marked draining (no new requests) so it becomes idle for the swap."""
        deadline = time.monotonic() + self.replicas.config.no_replica_timeout_s
        self._waiting[snapshot] += 1
        try:
            while True:
                names = self._candidates(failed)
                states = {name: self._state(name) for name in names}
                self._last_wanted[snapshot] = time.monotonic()
                ready = [n for n, s in states.items() if s.loaded == snapshot and not s.draining and not s.swapping]
                if ready:
                    name = min(ready, key=lambda n: states[n].inflight)
                    states[name].inflight += 1
                    if states[name].inflight > 1:
                        self._spread(snapshot, states)
                    return name
                needs_swap = not any(s.loaded == snapshot or s.swapping for s in states.values())
                idle = [n for n, s in states.items() if s.inflight == 0 and not s.swapping]
                if needs_swap and idle:
                    name = idle[0]
                    states[name].swapping, states[name].draining = True, False
                    break
                if not needs_swap and not self._swap_wanted(states):
                    # This snapshot's replicas drain for a swap nobody waits for any more: serve again.
                    for state in states.values():
                        state.draining = state.draining and state.loaded != snapshot
                    if any(s.loaded == snapshot and not s.draining and not s.swapping for s in states.values()):
                        continue
                if needs_swap and names and not idle and not any(s.swapping for s in states.values()):
                    states[min(names, key=lambda n: states[n].inflight)].draining = True
                if time.monotonic() >= deadline:
                    raise Unavailable(
                        f"no healthy rollout replica could serve this sample ({self.replicas.describe()})"
                    )
                # woken by finished requests and loads, or re-checked as the fleet's health changes
                await self._changed.wait(timeout=1.0)
        finally:
            self._waiting[snapshot] -= 1
        return await self._load(name, snapshot)

    def _swap_wanted(self, states: dict[str, _Serving]) -> bool:
        """Whether a request waits for a snapshot that no replica serves or is loading."""
        return any(
            count > 0 and not any(s.loaded == wanted or s.swapping for s in states.values())
            for wanted, count in self._waiting.items()
        )

    def _spread(self, snapshot: Path, states: dict[str, _Serving]) -> None:
        """Every replica serving `snapshot` is busy: load it onto an idle replica whose own snapshot is not
        in use (no request in flight, none asked for lately), in the background."""
        if any(state.swapping for state in states.values()):
            return  # one load at a time: a spread already under way may be for this very snapshot
        quiet_since = time.monotonic() - SPREAD_QUIET_S
        spare = [
            name
            for name, state in states.items()
            if state.inflight == 0
            and not state.draining
            and state.loaded != snapshot
            and (state.loaded is None or self._last_wanted.get(state.loaded, float("-inf")) < quiet_since)
        ]
        if not spare:
            return
        name = spare[0]
        states[name].swapping = True
        task = asyncio.get_running_loop().create_task(self._spread_to(name, snapshot))
        self._spreading.add(task)
        task.add_done_callback(self._spreading.discard)

    async def _spread_to(self, name: str, snapshot: Path) -> None:
        try:
            await self._load(name, snapshot, claim=False)
        except _LoadFailed as exc:
            logger.warning("rollout %s failed to load a snapshot in demand (%s)", name, exc)
            if name in self.replicas.health.replicas:
                self.replicas.health.failed(name)
        except Exception as exc:  # deleted snapshot, removed replica, refused load: the request ran anyway
            logger.warning("rollout %s did not take a snapshot in demand: %s", name, exc)

    async def _load(self, name: str, snapshot: Path, claim: bool = True) -> str:
        """Load `snapshot` on `name` (marked swapping by the caller); `claim`: the caller's request runs there."""
        state = self._state(name)
        try:
            if not snapshot.is_dir():
                raise NotFound("the weights of this sampling client no longer exist; save them again")
            version = state.version + 1
            request = rollout_pb2.LoadWeightsRequest(path=str(snapshot), version=version)
            try:
                await call(self.replicas.stub(name).LoadWeights(request))
            except (Unavailable, DeadlineExceeded, grpc.aio.AioRpcError) as exc:
                raise _LoadFailed(name, str(exc)) from exc
            self.loads += 1
        except BaseException:
            state.swapping = False
            self._changed.notify()
            raise
        state.version, state.loaded, state.swapping = version, snapshot, False
        state.inflight += 1 if claim else 0
        self._changed.notify()
        return name

    async def close(self) -> None:
        for task in list(self._spreading):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.replicas.close()
