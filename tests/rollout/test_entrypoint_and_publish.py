"""`anvil rollout` serves, and the learner publishes to it: after PublishWeights the rollout serves
version = step and its logprobs equal the learner's forward logprobs for the same tokens."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from learner.server import start_learner
from learner.transports import shm
from protos.anvil.v1 import common_pb2, learner_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.learner.client import LearnerTestClient, random_rows
from tests.rollout.conftest import start_process, stop_process

TOKENS = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5, 30, 31, 2]


@pytest.fixture
def rollout_process(engine):
    """`anvil rollout` serving anvil-tiny; the vLLM case uses configs/rollout.toml as a user would."""
    command = [str(Path(sys.executable).parent / "anvil"), "rollout", "--set", "server.port=0"]
    command += ["--config", "configs/rollout.toml"] if engine == "vllm" else ["--set", 'engine.type="torch"']
    process, address = start_process(command, engine)
    yield address
    assert stop_process(process) == 0


@pytest.mark.parametrize("transport", ["stream", "checkpoint", "shm", "auto"])
async def test_learner_publishes_to_rollout_with_logprob_parity(learner_config, rollout_process, transport):
    shm._remove_spare()  # an earlier test's warm segment file (kept, named, by design) is not this test's
    running, servicer = await start_learner(learner_config)
    try:
        async with open_channel(running.address) as channel:
            client = await LearnerTestClient.create(channel, servicer)
            await client.forward_backward(random_rows(512))
            await client.optim_step(learning_rate=1e-2)
            reply = await client.publish([rollout_process], transport)
            assert reply.version == 1
            assert reply.num_bytes == (
                sum(p.numel() * 4 for p in client.model.parameters()) if transport == "stream" else 0
            )
            row = {"model_input": TOKENS[:-1], "target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)}
            learner_logprobs, _ = await client.forward([row])

            async with open_channel(rollout_process) as rollout_channel:
                stub = rollout_pb2_grpc.RolloutServiceStub(rollout_channel)
                scored = await stub.ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=TOKENS))
                assert scored.weight_version == 1
                np.testing.assert_allclose(np.array(scored.logprobs), learner_logprobs[0], atol=1e-4)

            # Publishing the same version again is refused by the rollout, and reported as such.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.publish([rollout_process], transport)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert rollout_process in info.value.details()

            # partial_ok: an unreachable target does not fail the call; each target's outcome comes back.
            await client.forward_backward(random_rows(512))
            await client.optim_step(learning_rate=1e-2)
            # A hung target (accepts connections, never answers) fails after target_timeout_s, not never.
            hung = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
            hung_address = f"127.0.0.1:{hung.sockets[0].getsockname()[1]}"
            partial = await client.publish(
                [rollout_process, "127.0.0.1:1", hung_address], transport, partial_ok=True, target_timeout_s=3.0
            )
            hung.close()
            assert partial.version == 2
            assert [(t.address, t.ok) for t in partial.targets] == [
                (rollout_process, True), ("127.0.0.1:1", False), (hung_address, False)
            ]  # fmt: skip
            assert "127.0.0.1:1" in partial.targets[1].error and not partial.targets[0].error
            assert "did not take the weights within 3s" in partial.targets[2].error
            async with open_channel(rollout_process) as rollout_channel:
                stub = rollout_pb2_grpc.RolloutServiceStub(rollout_channel)
                assert (await stub.GetInfo(rollout_pb2.RolloutServiceGetInfoRequest())).weight_version == 2
            # The warm shared-memory segment is removed once a publication had dead or hung targets.
            assert not list(Path("/dev/shm").glob(f"anvil-weights-{os.getpid()}-*"))
    finally:
        await running.stop(0)


async def test_publish_rejects_bad_requests_before_any_work(learner):
    servicer, address = learner
    async with open_channel(address) as channel:
        client = await LearnerTestClient.create(channel, servicer)
        for targets, transport, message in [
            ([], "stream", "targets is empty"),
            (["127.0.0.1:1"], "carrier-pigeon", "unknown transport"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.stub.PublishWeights(
                    learner_pb2.PublishWeightsRequest(
                        session_id=client.session_id,
                        seq_id=client.take_seq_id(),
                        targets=[common_pb2.WeightTarget(address=a) for a in targets],
                        transport=transport,
                    )
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.stub.PublishWeights(
                learner_pb2.PublishWeightsRequest(
                    session_id=client.session_id,
                    seq_id=client.take_seq_id(),
                    targets=[common_pb2.WeightTarget(address="127.0.0.1:1")],
                )
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
