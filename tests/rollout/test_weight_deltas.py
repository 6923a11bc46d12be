"""Lossless weight deltas (xor-zstd): the codec, and a real learner publishing to real torch replicas.

After an optimizer step the learner sends each piece as zstd(new XOR the bytes the replicas verified at
their last commit) where that is smaller: fewer bytes leave the learner than the model holds, the
replicas' digest check passes (the rebuilt weights are bit for bit the learner's), and their logprobs
equal the learner's forward pass. A replica that holds no base, or another one, gets raw bytes; a delta
against bytes it does not hold is refused and leaves the served weights as they were.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from learner.server import start_learner
from protos.anvil.v1 import common_pb2, learner_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.errors import InvalidArgument
from protos.weights_codec import DeltaBase, framed_push_requests
from protos.weights_delta import apply_in_place, encode_piece, xor_zstd_encode
from protos.weights_relay import PUSH_METHOD
from tests.learner.client import LearnerTestClient, random_rows
from tests.rollout.test_relay import start_replica
from tests.rollout.test_weight_updates import served_logprobs

TOKENS = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5, 30, 31, 2]


def test_the_codec_is_exact_and_never_larger():
    generator = np.random.default_rng(0)
    before = generator.standard_normal(50_000).astype(np.float32)
    after = before + (generator.standard_normal(before.size) * 1e-4).astype(np.float32)
    blob = encode_piece(after.tobytes(), before.tobytes())
    assert blob is not None and len(blob) < after.nbytes
    rebuilt = np.frombuffer(bytearray(before.tobytes()), dtype=np.uint8)
    apply_in_place(rebuilt, blob, after.nbytes)
    assert rebuilt.tobytes() == after.tobytes(), "bit for bit"
    noise = generator.integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    assert encode_piece(noise, bytes(len(noise))) is None, "incompressible: raw is smaller"
    with pytest.raises(InvalidArgument, match="announced"):
        apply_in_place(np.zeros(10, dtype=np.uint8), xor_zstd_encode(bytes(12), bytes(12)), 10)
    with pytest.raises(InvalidArgument, match="corrupt"):
        apply_in_place(np.zeros(10, dtype=np.uint8), b"not zstd", 10)


async def publish(client: LearnerTestClient, addresses: list[str]) -> learner_pb2.PublishWeightsResponse:
    return await client.stub.PublishWeights(
        learner_pb2.PublishWeightsRequest(
            session_id=client.session_id,
            seq_id=client.take_seq_id(),
            targets=[common_pb2.WeightTarget(address=address) for address in addresses],
        )
    )


async def step(client: LearnerTestClient) -> None:
    await client.forward_backward(random_rows(64))
    await client.optim_step(learning_rate=1e-3)


async def test_published_steps_go_as_deltas_and_land_exactly(learner_config, tiny_model_dir):
    replicas = [await start_replica(tiny_model_dir) for _ in range(3)]
    running, servicer = await start_learner(learner_config.model_copy(update={"weight_deltas": True}))
    try:
        async with open_channel(running.address) as channel:
            client = await LearnerTestClient.create(channel, servicer)
            pair = [replicas[0].address, replicas[1].address]
            await step(client)
            first = await publish(client, pair)
            assert first.egress_bytes == first.model_bytes, "nothing held yet: raw"
            await step(client)
            second = await publish(client, pair)
            assert all(target.ok for target in second.targets)
            assert 0 < second.egress_bytes < 0.9 * second.model_bytes, "a delta from the bytes both replicas hold"
            row = {"model_input": TOKENS[:-1], "target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)}
            learner_logprobs, _ = await client.forward([row])
            for address in pair:
                async with open_channel(address) as rollout_channel:
                    stub = rollout_pb2_grpc.RolloutServiceStub(rollout_channel)
                    scored = await stub.ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=TOKENS))
                assert scored.weight_version == 2
                np.testing.assert_allclose(np.array(scored.logprobs), learner_logprobs[0], atol=1e-4)

            # A chain with a replica that holds no base goes raw, for all of it.
            await step(client)
            mixed = await publish(client, [replicas[0].address, replicas[2].address])
            assert all(target.ok for target in mixed.targets)
            assert mixed.egress_bytes == mixed.model_bytes
    finally:
        await running.stop(0)
        for replica in replicas:
            await replica.stop(0)


async def test_a_delta_from_bytes_the_replica_does_not_hold_is_refused(tiny_model_dir, base_model):
    replica = await start_replica(tiny_model_dir)
    try:
        async with open_channel(replica.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            before = await served_logprobs(stub)
            opened = await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=1))
            assert opened.delta_base == 0, "a fresh replica holds no base"
            from learner.transports.stream import tensors_as_bytes

            snapshot = sorted(tensors_as_bytes(base_model.named_parameters()), key=lambda t: t.name)
            zeros = {t.name: t.__class__(t.name, t.dtype, t.shape, np.zeros_like(t.data)) for t in snapshot}
            claimed = DeltaBase(7, zeros, "xxh3-128-tree-v1:" + "0" * 32)
            push = channel.stream_unary(PUSH_METHOD, request_serializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await push(framed_push_requests(1, snapshot, base=claimed))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "send it raw" in info.value.details()
            assert await served_logprobs(stub) == before
    finally:
        await replica.stop(0)
