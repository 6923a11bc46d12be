"""Services on a Ray cluster: each started service runs on the node Ray places its actor on.

A `ServiceHost` actor starts the service there exactly as `coordinator.launcher.start_service` does on
this machine (the same `python -m learner|rollout --set ...`, its log at the same path on that node),
bound to the node's own address instead of loopback, and tied to the actor's life (the service is the
actor's child with PR_SET_PDEATHSIG): if Ray kills the actor, or its node dies, the service goes too.
The coordinator (the Ray driver) gets a `RayService` handle with what it has for a local process -
address, pid, a non-blocking `poll`, `stop` - so the fleet's supervisor restarts a replica on Ray the
same way (a dead actor polls as exited; its replacement is a new actor, placed by Ray on any node with
the resources, and rejoins through the fleet's stale state).

Ray is imported lazily (the `ray` extra): nothing here runs unless `[cluster] type = "ray"`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.launcher import start_service, toml_value

logger = logging.getLogger(__name__)

ACTOR_DEAD_CODE = -9
"""What `poll` reports for a service whose actor (or node) is gone."""


class ServiceHost:
    """The Ray actor behind one service (defined without Ray; `ray.remote` wraps it when used)."""

    def __init__(self) -> None:
        self.service = None

    async def start(
        self,
        name: str,
        module: str,
        overrides: list[str],
        log_dir: str,
        env: dict[str, str],
        timeout_s: float,
        arguments: tuple[str, ...],
        listens: bool = True,
    ) -> tuple[str, int]:
        import ray

        host = ray.util.get_node_ip_address()  # reachable from the other nodes, unlike loopback
        overrides = [*overrides, f"server.host={toml_value(host)}"]
        self.service = await start_service(
            name, module, overrides, Path(log_dir), env, timeout_s, arguments, listens=listens
        )
        return self.service.address, self.service.pid

    def node(self) -> tuple[str, str, int]:
        """This node's id and address, and a port free on it (a rendezvous for the ranks placed here)."""
        import ray

        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), port

    def poll(self) -> int | None:
        return self.service.poll() if self.service is not None else None

    def stop(self) -> int | None:
        return self.service.stop() if self.service is not None else None

    def kill_group(self) -> None:
        """Kill what the service left in its process group on this node (a vLLM replica's engine core
        outlives a kill -9 of the replica, reparented to init: the actor's death would not reach it)."""
        if self.service is not None:
            self.service.kill_group()


@dataclass
class RayService:
    """The coordinator's handle on a service running behind a `ServiceHost` actor."""

    name: str
    actor: Any
    address: str
    remote_pid: int
    log_path: Path
    _polling: Any = None
    _code: int | None = field(default=None)

    @property
    def pid(self) -> int:
        """The service's pid on its node."""
        return self.remote_pid

    @property
    def returncode(self) -> int | None:
        return self._code

    def poll(self) -> int | None:
        """Its exit code or None, without blocking: the answer of the last poll sent to the actor (a dead
        actor - its node gone, or killed - counts as exited)."""
        import ray

        if self._code is not None:
            return self._code
        if self._polling is None:
            self._polling = self.actor.poll.remote()
        ready, _ = ray.wait([self._polling], timeout=0)
        if ready:
            try:
                self._code = ray.get(self._polling)
            except ray.exceptions.RayActorError:
                self._code = ACTOR_DEAD_CODE
            self._polling = None
        return self._code

    def stop(self, timeout_s: float = 60.0) -> int | None:
        import ray

        try:
            self._code = ray.get(self.actor.stop.remote(), timeout=timeout_s + 5)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self._code = ACTOR_DEAD_CODE
        finally:
            ray.kill(self.actor)
        return self._code

    def kill_group(self) -> None:
        """Kill the service's process group on its node (through the actor, if it still answers), then the
        actor; a service still running dies with it (PR_SET_PDEATHSIG)."""
        import ray

        with contextlib.suppress(ray.exceptions.RayError):
            ray.get(self.actor.kill_group.remote(), timeout=10)
        ray.kill(self.actor)
