"""The rollout fleet's health and routing as a pure state machine: no processes, no clocks, no I/O.

Each replica is HEALTHY, SUSPECT, DEAD, RESTARTING or STALE:

    HEALTHY --probe/request fails--> SUSPECT --`failures_to_dead` in a row--> DEAD
    SUSPECT or DEAD --probe succeeds--> HEALTHY, or STALE when it serves an older version than the fleet
    DEAD --its process exited and the supervisor restarts it--> RESTARTING --listening again--> STALE
    STALE --the current weights were published to it (digest verified)--> HEALTHY

A DEAD replica whose process is alive (a hung or stopped one) stays probed: when it answers again it
rejoins through STALE like a restarted one, having missed the publications made meanwhile.

Only HEALTHY replicas get traffic, so every request runs on the fleet's current weight version (or the
previous one while a publication is under way). Routing picks the healthy replica with the fewest requests
in flight; a request with a session key sticks to the replica it used before while that one stays healthy
(its prefix cache keeps hitting). `coordinator.fleet.replica_set.ReplicaSet` drives this with real probes,
calls and publications; the unit tests drive it directly.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

STICKY_SESSIONS_KEPT = 10_000


class ReplicaState(enum.Enum):
    HEALTHY = "healthy"
    SUSPECT = "suspect"
    DEAD = "dead"
    RESTARTING = "restarting"
    STALE = "stale"


@dataclass
class Replica:
    name: str
    """Stable for the replica's life in the fleet (its address may change when it is restarted)."""
    address: str
    state: ReplicaState = ReplicaState.STALE
    version: int = -1
    """The weight version it was last seen or made to serve; -1 before anything is known."""
    in_flight: int = 0
    failures: int = 0
    """Consecutive failed probes or requests."""
    restarts: int = 0
    requests: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    """Time spent answering requests, summed over requests (for tokens per second)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.busy_s if self.busy_s > 0 else 0.0


class FleetHealth:
    def __init__(self, failures_to_dead: int = 3) -> None:
        self.failures_to_dead = failures_to_dead
        self.version = 0
        """The weight version every healthy replica serves (the latest one published to the fleet)."""
        self.rewound_from = 0
        """The highest version published before the fleet was rewound to an earlier one (the learner was
        restored from a checkpoint); 0 once publications have passed it. A replica serving a version in
        (version, rewound_from] holds weights the learner went back on: STALE, resynced by a rewind."""
        self.replicas: dict[str, Replica] = {}
        self._sticky: OrderedDict[str, str] = OrderedDict()

    # --- membership ----------------------------------------------------------------------------------

    def add(self, name: str, address: str) -> Replica:
        """A new replica starts STALE: it gets traffic once it is known to serve the current version."""
        if name in self.replicas:
            raise ValueError(f"replica {name!r} is already in the fleet")
        self.replicas[name] = replica = Replica(name, address)
        return replica

    def remove(self, name: str) -> Replica:
        return self.replicas.pop(name)

    # --- what was observed ---------------------------------------------------------------------------

    def probe_succeeded(self, name: str, version: int) -> None:
        """It answered, serving `version`: trusted again if it holds the fleet's version, else STALE."""
        replica = self.replicas[name]
        if replica.state is ReplicaState.RESTARTING:
            return  # the supervisor says when it is back (restarted())
        replica.failures = 0
        replica.version = version
        current = version >= self.version and not self.diverged(version)
        replica.state = ReplicaState.HEALTHY if current else ReplicaState.STALE

    def failed(self, name: str) -> None:
        """A probe or a request failed as unreachable or too slow: suspect at once, dead after a run of them."""
        replica = self.replicas[name]
        if replica.state is ReplicaState.RESTARTING:
            return
        replica.failures += 1
        if replica.failures >= self.failures_to_dead:
            replica.state = ReplicaState.DEAD
        elif replica.state is ReplicaState.HEALTHY:
            replica.state = ReplicaState.SUSPECT

    def died(self, name: str) -> None:
        """Its process is known to be gone (the supervisor saw it exit)."""
        replica = self.replicas[name]
        replica.state = ReplicaState.DEAD
        replica.in_flight = 0

    def restarting(self, name: str) -> None:
        self.replicas[name].state = ReplicaState.RESTARTING

    def restarted(self, name: str, address: str) -> None:
        """Listening again (maybe elsewhere): STALE until the current weights are published to it."""
        replica = self.replicas[name]
        replica.address, replica.state, replica.version = address, ReplicaState.STALE, -1
        replica.failures, replica.in_flight = 0, 0
        replica.restarts += 1

    def diverged(self, version: int) -> bool:
        """Whether `version` is one the fleet was rewound past (weights no longer the learner's)."""
        return self.version < version <= self.rewound_from

    def published(
        self, version: int, succeeded: Iterable[str], failed: Iterable[str] = (), rewind: bool = False
    ) -> None:
        """Weights `version` reached `succeeded` (digest verified there); `failed` did not take them. The
        fleet's version moves on (back, with `rewind`): replicas behind it, or ahead of a rewind, are STALE
        until they are resynced. A failed publication does not count towards DEAD (an unreachable replica
        fails its probes too)."""
        if rewind and version < self.version:
            self.rewound_from = max(self.rewound_from, self.version)
            self.version = version
        else:
            self.version = max(self.version, version)
        if self.version > self.rewound_from:
            self.rewound_from = 0
        for name in succeeded:
            replica = self.replicas.get(name)
            if replica is not None and replica.state in (
                ReplicaState.HEALTHY,
                ReplicaState.SUSPECT,
                ReplicaState.STALE,
            ):
                replica.version = version
                replica.failures = 0
                replica.state = ReplicaState.HEALTHY if version >= self.version else ReplicaState.STALE
        for replica in self.replicas.values():
            behind = replica.version < self.version or self.diverged(replica.version)
            if replica.state in (ReplicaState.HEALTHY, ReplicaState.SUSPECT) and behind:
                replica.state = ReplicaState.STALE

    # --- routing -------------------------------------------------------------------------------------

    def routable(self, exclude: Iterable[str] = ()) -> list[Replica]:
        excluded = set(exclude)
        return [r for r in self.replicas.values() if r.state is ReplicaState.HEALTHY and r.name not in excluded]

    def pick(self, session_key: str | None = None, exclude: Iterable[str] = ()) -> Replica | None:
        """The healthy replica for the next request: the session's own one while it is healthy, else the
        one with the fewest requests in flight (ties: the fewest requests so far). None when none is."""
        candidates = self.routable(exclude)
        if not candidates:
            return None
        if session_key is not None:
            sticky = self.replicas.get(self._sticky.get(session_key, ""))
            if sticky is not None and sticky in candidates:
                self._sticky.move_to_end(session_key)
                return sticky
        chosen = min(candidates, key=lambda r: (r.in_flight, r.requests))
        if session_key is not None:
            self._sticky[session_key] = chosen.name
            self._sticky.move_to_end(session_key)
            while len(self._sticky) > STICKY_SESSIONS_KEPT:
                self._sticky.popitem(last=False)
        return chosen

    def started(self, name: str) -> None:
        replica = self.replicas[name]
        replica.in_flight += 1
        replica.requests += 1

    def finished(self, name: str, tokens: int = 0, seconds: float = 0.0) -> None:
        replica = self.replicas.get(name)
        if replica is None:
            return
        replica.in_flight = max(0, replica.in_flight - 1)
        replica.tokens += tokens
        replica.busy_s += seconds

    def stale(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.state is ReplicaState.STALE]
