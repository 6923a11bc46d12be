"""The fleet's health and routing state machine, without processes: every transition and routing rule."""

from __future__ import annotations

from coordinator.fleet.health import FleetHealth, ReplicaState

H, S, D, R, ST = (ReplicaState.HEALTHY, ReplicaState.SUSPECT, ReplicaState.DEAD, ReplicaState.RESTARTING,
                  ReplicaState.STALE)  # fmt: skip


def fleet(*names: str, version: int = 0) -> FleetHealth:
    health = FleetHealth(failures_to_dead=3)
    health.version = version
    for name in names:
        health.add(name, f"{name}:1")
        health.probe_succeeded(name, version)
    return health


def states(health: FleetHealth) -> dict[str, ReplicaState]:
    return {name: r.state for name, r in health.replicas.items()}


def test_a_new_replica_is_stale_until_it_serves_the_fleet_version():
    health = fleet(version=4)
    health.add("a", "a:1")
    assert states(health) == {"a": ST} and health.pick() is None
    health.probe_succeeded("a", version=3)
    assert states(health) == {"a": ST}, "behind the fleet: no traffic"
    health.published(4, succeeded=["a"])
    assert states(health) == {"a": H} and health.pick().name == "a"


def test_failures_make_a_replica_suspect_then_dead_and_a_success_clears_suspicion():
    health = fleet("a", "b")
    health.failed("a")
    assert states(health) == {"a": S, "b": H}
    assert health.pick().name == "b", "a suspect replica gets no traffic"
    health.probe_succeeded("a", 0)
    assert states(health)["a"] is H and health.replicas["a"].failures == 0
    for _ in range(3):
        health.failed("a")
    assert states(health)["a"] is D
    health.failed("a")
    assert health.replicas["a"].failures == 4 and states(health)["a"] is D
    health.published(1, succeeded=["b"])
    health.probe_succeeded("a", 0)  # a stopped process that runs again; it missed version 1
    assert states(health)["a"] is ST
    health.restarting("a")
    health.probe_succeeded("a", 1)
    assert states(health)["a"] is R, "while restarting, only the supervisor says when it is back"


def test_restart_goes_through_stale_and_a_resync_at_the_current_version():
    health = fleet("a", "b", version=2)
    health.died("a")
    health.restarting("a")
    assert states(health) == {"a": R, "b": H}
    health.restarted("a", "a:2")
    replica = health.replicas["a"]
    assert (replica.state, replica.address, replica.version, replica.restarts) == (ST, "a:2", -1, 1)
    health.probe_succeeded("a", 0)  # a fresh process serves the base weights
    assert states(health)["a"] is ST
    health.published(2, succeeded=["a"])
    assert states(health) == {"a": H, "b": H}


def test_a_publication_moves_the_fleet_version_and_leaves_who_missed_it_stale():
    health = fleet("a", "b", "c")
    health.published(1, succeeded=["a", "b"], failed=["c"])
    assert states(health) == {"a": H, "b": H, "c": ST}
    assert health.replicas["c"].failures == 0, "a refused publication is not a sign of death"
    assert [r.name for r in health.stale()] == ["c"]
    health.published(2, succeeded=["a"])
    assert states(health) == {"a": H, "b": ST, "c": ST}, "b still serves version 1"


def test_least_in_flight_routing_with_exclusions():
    health = fleet("a", "b", "c")
    for name in ("a", "a", "b"):
        health.started(name)
    assert health.pick().name == "c"
    health.started("c")
    health.started("c")
    assert health.pick().name == "b"
    assert health.pick(exclude=["b"]).name == "a", "a failed-over request avoids the replica that failed it"
    health.finished("a", tokens=10, seconds=0.5)
    health.finished("a", tokens=10, seconds=0.5)
    assert health.pick().name == "a" and health.replicas["a"].tokens_per_s == 20.0
    assert health.pick(exclude=["a", "b", "c"]) is None


def test_sticky_sessions_keep_their_replica_while_it_is_healthy():
    health = fleet("a", "b")
    first = health.pick(session_key="conversation-1").name
    health.started(first)
    health.started(first)
    assert health.pick(session_key="conversation-1").name == first, "sticky beats least-loaded"
    assert health.pick(session_key="conversation-2").name != first
    health.failed(first)
    moved = health.pick(session_key="conversation-1").name
    assert moved != first
    health.probe_succeeded(first, 0)
    assert health.pick(session_key="conversation-1").name == moved, "it stays where it moved"


def test_removing_a_replica_forgets_it_and_late_results_are_ignored():
    health = fleet("a", "b")
    health.started("a")
    health.remove("a")
    health.finished("a", tokens=5, seconds=1.0)
    assert list(health.replicas) == ["b"] and health.pick().name == "b"
