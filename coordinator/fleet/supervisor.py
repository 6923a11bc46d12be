"""ReplicaSupervisor: restarts the rollout replicas this process started when they exit.

`anvil run` and `anvil serve` start their replicas as local processes (coordinator.launcher); this watches
each one, and when a process exits (killed, crashed, out of memory) it kills whatever the replica left
behind in its process group (vLLM's engine-core and worker processes), tells the ReplicaSet the replica
is DEAD, then RESTARTING, waits `restart_backoff_s` (doubling per restart of that replica, at most 30 s),
starts it again with the same settings and hands the new address to the ReplicaSet, which keeps it STALE
until the current weights are published to it. After `max_restarts` restarts a replica stays dead.
A replica that hangs without exiting is first the ReplicaSet's business (probes declare it dead and move
its requests; it rejoins if it answers again); if it is still dead `hung_kill_after_s` later, its
process group is killed, so it restarts like one that exited - and whatever waited on it (a weight push
into a stopped process, which no probe can end) fails at once instead of at its own timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from coordinator.fleet.config import FleetConfig
from coordinator.fleet.health import ReplicaState
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.launcher import ServiceHandle

logger = logging.getLogger(__name__)

MAX_BACKOFF_S = 30.0
WATCH_INTERVAL_S = 0.5
HUNG = "rollout %s has not answered for %.0fs although its process runs (hung or stopped); killing it to restart it"

Restart = Callable[[str], Awaitable[ServiceHandle]]
"""Start replica `name` again with its original settings; return the new process (listening)."""


class ReplicaSupervisor:
    def __init__(self, replicas: ReplicaSet, config: FleetConfig, restart: Restart) -> None:
        self.replicas = replicas
        self.config = config
        self.restart = restart
        self.processes: dict[str, ServiceHandle] = {}
        self.restarts: dict[str, int] = {}
        self._watcher: asyncio.Task | None = None

    def watch(self, name: str, process: ServiceHandle) -> None:
        self.processes[name] = process
        self.restarts.setdefault(name, 0)
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch_forever())

    async def _watch_forever(self) -> None:
        restarting: dict[str, asyncio.Task] = {}
        dead_since: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(WATCH_INTERVAL_S)
                for name, process in list(self.processes.items()):
                    if name not in self.replicas.health.replicas and name not in restarting:
                        del self.processes[name]  # removed from the fleet: stop the process we started
                        await asyncio.to_thread(process.stop)
                    elif name not in restarting and process.poll() is not None:
                        dead_since.pop(name, None)
                        restarting[name] = asyncio.create_task(self._replace(name, process))
                    elif name not in restarting and self._hung_for(name, dead_since, loop.time()):
                        logger.warning(HUNG, name, self.config.hung_kill_after_s)
                        await asyncio.to_thread(process.kill_group)
                for name in [name for name, task in restarting.items() if task.done()]:
                    restarting.pop(name)
        finally:
            for task in restarting.values():
                task.cancel()

    def _hung_for(self, name: str, dead_since: dict[str, float], now: float) -> bool:
        """Whether replica `name` has been DEAD (by probes) for `hung_kill_after_s`, tracked in `dead_since`."""
        replica = self.replicas.health.replicas.get(name)
        if replica is None or replica.state is not ReplicaState.DEAD:
            dead_since.pop(name, None)
            return False
        since = dead_since.setdefault(name, now)
        return now - since >= self.config.hung_kill_after_s

    async def _replace(self, name: str, dead: ServiceHandle) -> None:
        code = dead.returncode
        dead.kill_group()
        await self.replicas.mark(name, ReplicaState.DEAD)
        count = self.restarts[name]
        if count >= self.config.max_restarts:
            logger.error("rollout %s exited (code %s) and was restarted %d times already; it stays dead", name, code,
                         count)  # fmt: skip
            del self.processes[name]
            return
        backoff = min(MAX_BACKOFF_S, self.config.restart_backoff_s * 2**count)
        logger.warning("rollout %s exited (code %s); restarting it in %.1fs (restart %d of at most %d)", name, code,
                       backoff, count + 1, self.config.max_restarts)  # fmt: skip
        await self.replicas.mark(name, ReplicaState.RESTARTING)
        await asyncio.sleep(backoff)
        self.restarts[name] = count + 1
        try:
            process = await self.restart(name)
        except Exception as exc:
            logger.error("restarting rollout %s failed: %s", name, exc)
            return  # still recorded as the dead process: the next watch round tries again
        self.processes[name] = process
        await self.replicas.restarted(name, process.address)
        logger.warning("rollout %s is back at %s; it serves again once it holds the current weights", name,
                       process.address)  # fmt: skip

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
