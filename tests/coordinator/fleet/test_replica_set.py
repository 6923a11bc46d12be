"""ReplicaSet against real rollout servers (torch engine, in process) and a real learner: routing spreads
load, a replica that goes away has its requests moved, a new replica is stale until the learner's current
weights are published to it, and with no healthy replica a request waits, then fails clearly."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import SamplingParams
from coordinator.fleet.config import FleetConfig
from coordinator.fleet.health import ReplicaState
from coordinator.fleet.replica_set import ReplicaSet
from learner.server import start_learner
from protos.anvil.v1 import rollout_pb2
from protos.channels import open_channel
from protos.errors import Unavailable
from protos.rpc import ServerConfig
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout
from tests.learner.client import random_rows

PROMPT = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5]
FAST = FleetConfig(probe_interval_s=0.2, probe_timeout_s=2.0, failures_to_dead=2, no_replica_timeout_s=60)


async def start_replica(model_dir):
    config = RolloutConfig(
        model=model_dir, model_name="anvil-tiny", server=ServerConfig(), engine=TorchEngineConfig(device="cpu")
    )
    running, _ = await start_rollout(config)
    return running


async def until(condition, timeout_s: float = 30.0) -> None:
    for _ in range(int(timeout_s / 0.1)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not reached in time")


async def test_failover_and_rejoin_at_the_current_version(tiny_model_dir, learner_config):
    first, second = await start_replica(tiny_model_dir), await start_replica(tiny_model_dir)
    third = None
    learner, _ = await start_learner(learner_config)
    fleet = await ReplicaSet.connect([first.address, second.address], FAST)
    try:
        async with open_channel(learner.address) as channel:
            session = await LearnerSession.create(channel, "anvil-tiny")
            fleet.publisher = lambda addresses, rewind=False: session.publish_weights(
                addresses, partial_ok=True, rewind=rewind
            )
            params = SamplingParams(max_tokens=4, seed=1)
            assert {r.state for r in fleet.health.replicas.values()} == {ReplicaState.HEALTHY}
            await asyncio.gather(*(fleet.sample(PROMPT, 2, params) for _ in range(8)))
            assert all(r.requests >= 2 for r in fleet.health.replicas.values()), "least in-flight spreads load"

            await session.forward_rows(random_rows(512), "cross_entropy", None, backward=True)
            await session.optim_step()
            reply = await fleet.publish(fleet.publisher)
            assert reply.version == 1 and [r.version for r in fleet.health.replicas.values()] == [1, 1]

            await first.stop(0)  # replica-0 goes away; its requests must move to replica-1
            responses = await asyncio.gather(*(fleet.sample(PROMPT, 2, params) for _ in range(6)))
            assert all(r.weight_version == 1 for r in responses)
            await until(lambda: fleet.health.replicas["replica-0"].state is ReplicaState.DEAD)

            third = await start_replica(tiny_model_dir)  # a new replica serves the base weights (v0)
            fleet.add("replica-2", third.address)
            assert fleet.health.replicas["replica-2"].state is ReplicaState.STALE
            await until(lambda: fleet.health.replicas["replica-2"].state is ReplicaState.HEALTHY)
            assert fleet.health.replicas["replica-2"].version == 1, "resynced to the learner's version"
            tokens = [*PROMPT, 30, 31, 2]
            fresh = await fleet.stub("replica-2").ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=tokens))
            reference = await fleet.stub("replica-1").ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=tokens))
            assert fresh.weight_version == reference.weight_version == 1
            np.testing.assert_array_equal(np.array(fresh.logprobs), np.array(reference.logprobs))
            await session.close()
    finally:
        await fleet.close()
        for server in (first, second, third, learner):
            if server is not None:
                await server.stop(0)


async def test_no_healthy_replica_waits_then_fails_with_the_states():
    fleet = await ReplicaSet.connect(["127.0.0.1:1"], FleetConfig(probe_interval_s=0.2, no_replica_timeout_s=1.0))
    try:
        with pytest.raises(Unavailable, match=r"no healthy rollout replica for 1s \(replica-0 (stale|suspect|dead)"):
            await fleet.sample(PROMPT, 1, SamplingParams(max_tokens=1))
    finally:
        await fleet.close()


async def test_a_replica_restarted_mid_probe_does_not_end_the_watch():
    """grpc.aio raises CancelledError from a call whose channel is closed under it; the supervisor closes a
    replica's channel when it restarts it. A probe in flight then must count as failed, not end the prober
    (seen in CI: the prober died after a restart, and a later stopped replica was never declared dead)."""
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # accept, never answer
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
    config = FleetConfig(probe_interval_s=0.05, probe_timeout_s=1.0, failures_to_dead=2)
    fleet = await ReplicaSet.connect(addresses[:1], config)
    try:
        await asyncio.sleep(0.3)  # a probe round is waiting on the silent replica
        await fleet.restarted("replica-0", addresses[1])
        assert fleet.health.replicas["replica-0"].state is ReplicaState.STALE
        await until(lambda: fleet.health.replicas["replica-0"].state is ReplicaState.DEAD, timeout_s=15)
        assert not fleet._prober.done()
    finally:
        await fleet.close()
        for server in silent:
            server.close()


async def logprobs(fleet: ReplicaSet, name: str) -> tuple[int, np.ndarray]:
    reply = await fleet.stub(name).ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=[*PROMPT, 30, 31, 2]))
    return reply.weight_version, np.array(reply.logprobs)


async def test_a_rewind_brings_every_replica_back_to_the_learners_earlier_weights(tiny_model_dir, learner_config):
    """A learner restored to an earlier checkpoint publishes a lower version with rewind: replicas take it
    (without rewind they refuse: versions only increase), and a replica the rewind missed still serves
    the newer weights, is STALE, not routed to, and is resynced by a rewind of its own."""
    replicas = [await start_replica(tiny_model_dir) for _ in range(2)]
    learner, _ = await start_learner(learner_config)
    fleet = await ReplicaSet.connect([r.address for r in replicas], FAST)
    try:
        async with open_channel(learner.address) as channel:
            trained = await LearnerSession.create(channel, "anvil-tiny")
            fleet.publisher = lambda addresses, rewind=False: trained.publish_weights(addresses, partial_ok=True)
            for _ in range(2):
                await trained.forward_rows(random_rows(256), "cross_entropy", None, backward=True)
                await trained.optim_step()
                await fleet.publish(fleet.publisher)
            assert [r.version for r in fleet.health.replicas.values()] == [2, 2]
            _, at_two = await logprobs(fleet, "replica-0")

            restored = await LearnerSession.create(channel, "anvil-tiny")  # step 0: the base weights
            refused = await restored.publish_weights(fleet.addresses, partial_ok=True)
            assert not any(t.ok for t in refused.targets) and "not newer" in refused.targets[0].error

            fleet.publisher = lambda addresses, rewind=False: restored.publish_weights(
                addresses, partial_ok=True, rewind=rewind
            )
            fleet.health.replicas["replica-1"].failures = 1  # it missed the last probe: not a target
            await fleet.publish(fleet.publisher, rewind=True)
            health = fleet.health
            assert (health.version, health.rewound_from) == (0, 2)
            first = health.replicas["replica-0"]
            assert first.version == 0 and first.state is ReplicaState.HEALTHY
            version, base = await logprobs(fleet, "replica-0")
            assert version == 0 and not np.array_equal(base, at_two)
            assert (await logprobs(fleet, "replica-1"))[0] == 2  # still the weights the learner went back on
            await until(lambda: health.replicas["replica-1"].state is ReplicaState.HEALTHY)  # probed: STALE, resynced
            assert health.replicas["replica-1"].version == 0
            version, resynced = await logprobs(fleet, "replica-1")
            assert version == 0
            np.testing.assert_array_equal(resynced, base)
            for session in (trained, restored):
                await session.close()
    finally:
        await fleet.close()
        for server in (*replicas, learner):
            await server.stop(0)


async def test_a_step_no_replica_could_take_still_moves_the_fleet_on(tiny_model_dir):
    """Seen in CI on a loaded machine: every replica missed one probe (suspect) as a step published, so no
    replica was a target, the fleet's version stayed behind the learner's, and the next good probe made a
    replica serving the previous weights HEALTHY. The step's version moves the fleet on anyway: the replica
    comes back STALE, to be resynced before it gets traffic."""
    running = await start_replica(tiny_model_dir)
    fleet = await ReplicaSet.connect([running.address], FleetConfig(probe_interval_s=3600))
    try:
        await fleet.probe()
        assert fleet.health.replicas["replica-0"].state is ReplicaState.HEALTHY
        fleet.health.failed("replica-0")  # one probe too slow: suspect

        async def unreachable(addresses, rewind=False):
            raise AssertionError(f"no replica answered its last probe, yet {addresses} were published to")

        assert await fleet.publish(unreachable, version=3) is None
        assert fleet.health.version == 3
        await fleet.probe()
        replica = fleet.health.replicas["replica-0"]
        assert (replica.state, replica.version) == (ReplicaState.STALE, 0), "behind the learner: resynced first"
        assert await fleet.versions() == []
    finally:
        await fleet.close()
        await running.stop(0)
