"""The shm transport against real rollout processes: a corrupted or mismatched segment leaves the served
weights bit for bit as they were, and no segment outlives a publication, even when a replica is killed
while it maps one."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from learner.server import start_learner
from learner.transports.shm import Segment
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import common_pb2, learner_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.learner.client import LearnerTestClient, random_rows
from tests.rollout.conftest import start_rollout_process
from tests.rollout.helpers import perturbed
from tests.rollout.test_weight_updates import PROBE, assert_serves, served_logprobs


def own_segments() -> list[Path]:
    return list(Path("/dev/shm").glob(f"anvil-weights-{os.getpid()}-*"))


@pytest.mark.parametrize("damage", ["flipped_byte", "wrong_version", "truncated"])
async def test_bad_segment_leaves_the_served_weights_untouched(served, damage):
    snapshot = tensors_as_bytes(perturbed(served.model, seed=7).named_parameters())
    version = served.version + 1
    segment = Segment(version)
    try:
        await asyncio.to_thread(segment.write, snapshot)
        if damage == "flipped_byte":
            size = os.path.getsize(segment.path)
            with open(segment.path, "r+b") as file:
                file.seek(size - 5)
                byte = file.read(1)
                file.seek(size - 5)
                file.write(bytes([byte[0] ^ 0xFF]))
        elif damage == "truncated":
            os.truncate(segment.path, os.path.getsize(segment.path) // 2)
        async with open_channel(served.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            before = await served_logprobs(stub)
            loaded = version + 1 if damage == "wrong_version" else version
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(segment.path), version=loaded))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await served_logprobs(stub) == before  # bit for bit, and the same version
    finally:
        segment.release(keep=False)
    assert not own_segments()


async def test_no_segment_survives_a_replica_killed_while_loading(learner_config, tiny_model_dir):
    from learner.transports import shm

    shm._remove_spare()  # so that a named segment means this publication's LoadWeights is under way
    process, address = start_rollout_process(tiny_model_dir, "torch")
    running, servicer = await start_learner(learner_config)
    try:
        async with open_channel(running.address) as channel:
            client = await LearnerTestClient.create(channel, servicer)
            await client.forward_backward(random_rows(64))
            await client.optim_step(learning_rate=1e-2)
            publish = asyncio.ensure_future(
                client.stub.PublishWeights(
                    learner_pb2.PublishWeightsRequest(
                        session_id=client.session_id,
                        seq_id=client.take_seq_id(),
                        targets=[common_pb2.WeightTarget(address=address)],
                        transport="shm",
                    )
                )
            )
            while not own_segments() and not publish.done():  # the segment is named: LoadWeights is under way
                await asyncio.sleep(0.0005)
            process.kill()
            process.wait(timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await publish
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.FAILED_PRECONDITION)
            assert not own_segments()
    finally:
        if process.poll() is None:
            process.kill()
        await running.stop(0)


async def test_consecutive_publications_reuse_one_warm_file_and_serve_each_version(served):
    """The learner writes the next version into the file the replica mapped last time; the replica's warm
    mapping must show the new bytes, not the old ones."""
    from learner.transports import shm

    shm._remove_spare()
    paths = []
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        for seed in (11, 12):
            model, version = perturbed(served.model, seed=seed), served.version + 1
            segment = Segment(version)
            try:
                await asyncio.to_thread(segment.write, tensors_as_bytes(model.named_parameters()))
                await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(segment.path), version=version))
            finally:
                segment.release(keep=True)
            served.model, served.version = model, version
            paths.append(segment.path)
            logprobs, served_version = await served_logprobs(stub)
            assert served_version == version
            assert_serves(logprobs, model)
    assert paths[0] == paths[1] and own_segments() == [paths[0]]  # one warm file, named while it is kept
    shm._remove_spare()
    assert not own_segments()


def test_segment_files_of_dead_processes_are_swept(tmp_path):
    from learner.transports import shm

    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan = Path("/dev/shm") / f"anvil-weights-{dead.pid}-0123456789ab"
    orphan.write_bytes(b"ANVILSHM")
    living = Path("/dev/shm") / f"anvil-weights-{os.getppid()}-0123456789ab"  # the test runner's parent lives
    living.write_bytes(b"ANVILSHM")
    try:
        shm.SegmentFile().remove()
        assert not orphan.exists() and living.exists()
    finally:
        orphan.unlink(missing_ok=True)
        living.unlink(missing_ok=True)


async def test_segment_write_reuses_warm_file_only_after_clean_answers():
    from learner.transports import shm

    shm._remove_spare()
    first = Segment(1)
    first.release(keep=True)
    assert [first.file] == shm._SPARE and own_segments() == [first.path]
    second = Segment(2)
    assert second.file is first.file and not shm._SPARE
    second.release(keep=False)
    assert not shm._SPARE and not own_segments()
    assert PROBE  # the probe tokens the other tests score
