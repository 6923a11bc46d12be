"""The gateway's SnapshotRouter over two real rollout servers (torch engine, in process): a burst of
samples from one new snapshot spreads it to both replicas instead of queueing on the first one that
loaded it; two snapshots in use at once each keep a replica instead of swapping back and forth."""

from __future__ import annotations

import asyncio
import shutil

from coordinator.fleet.replica_set import ReplicaSet
from coordinator.gateway.snapshot_router import SnapshotRouter
from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.coordinator.fleet.test_replica_set import FAST, PROMPT, start_replica, until

REQUEST = rollout_pb2.SampleRequest(
    prompt_tokens=PROMPT, num_samples=2, sampling_params=common_pb2.SamplingParams(max_tokens=8, seed=3)
)


async def served_versions(addresses: list[str]) -> list[int]:
    versions = []
    for address in addresses:
        async with open_channel(address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            info = await stub.GetInfo(rollout_pb2.RolloutServiceGetInfoRequest())
            versions.append(info.weight_version)
    return versions


async def burst(router: SnapshotRouter, snapshot, count: int) -> list[rollout_pb2.SampleResponse]:
    return await asyncio.gather(*(router.run(snapshot, lambda stub: stub.Sample(REQUEST)) for _ in range(count)))


async def test_a_snapshot_in_demand_spreads_and_two_in_use_do_not_thrash(tiny_model_dir, tmp_path):
    first, second = await start_replica(tiny_model_dir), await start_replica(tiny_model_dir)
    fleet = await ReplicaSet.connect([first.address, second.address], FAST)
    router = SnapshotRouter(fleet, tiny_model_dir)
    await router.start()
    policy, reference = tmp_path / "policy-1", tmp_path / "reference"
    for snapshot in (policy, reference):
        shutil.copytree(tiny_model_dir, snapshot)
    try:
        replies = await burst(router, policy, 16)
        assert all(len(reply.sequences) == 2 for reply in replies)
        await until(lambda: all(not state.swapping for state in router._serving.values()))
        assert [router._serving[name].loaded for name in ("replica-0", "replica-1")] == [policy, policy]
        assert await served_versions([first.address, second.address]) == [1, 1]  # both took the snapshot
        assert router.loads == 2

        await asyncio.sleep(2.5)  # the policy snapshot goes quiet: a new one may take over its replicas
        loads = router.loads
        for _ in range(3):  # the policy and a reference snapshot sampled together, three rounds
            await asyncio.gather(burst(router, policy, 6), burst(router, reference, 6))
        loaded = sorted(str(router._serving[name].loaded) for name in ("replica-0", "replica-1"))
        assert loaded == sorted([str(policy), str(reference)]), "each snapshot in use keeps a replica"
        assert router.loads - loads <= 2, f"{router.loads - loads} loads: the replicas swapped back and forth"
    finally:
        await router.close()
        await first.stop(0)
        await second.stop(0)
