"""Weight updates on a real rollout server, for each engine: a committed push serves the new model; a
broken, mismatched or stale push leaves the served weights bit for bit as they were."""

from __future__ import annotations

import asyncio
import shutil

import grpc
import pytest
import torch

from learner.backends.torch_backend import TorchBackend
from learner.checkpoint import write_checkpoint
from learner.config import TorchBackendConfig
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.weights_codec import digest, encode_chunks, push_weight_update
from tests.rollout.helpers import perturbed, teacher_forced_logprobs

PROBE = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5, 30, 31, 2]
TOL = 1e-4
SMALL_CHUNKS = 64 * 1024  # several chunks per large tensor


async def served_logprobs(stub) -> tuple[list[float], int]:
    reply = await stub.ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=PROBE))
    return list(reply.logprobs), reply.weight_version


def assert_serves(logprobs: list[float], model) -> None:
    torch.testing.assert_close(torch.tensor(logprobs), teacher_forced_logprobs(model, PROBE), atol=TOL, rtol=0)


async def test_committed_push_serves_the_new_weights(served):
    new_model = perturbed(served.model, seed=1)
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        version = served.version + 1
        sent = await push_weight_update(channel, version, tensors_as_bytes(new_model.named_parameters()), SMALL_CHUNKS)
        assert sent == sum(p.numel() * 4 for p in new_model.parameters())
        logprobs, reported = await served_logprobs(stub)
        assert reported == version
        assert_serves(logprobs, new_model)
        assert not torch.allclose(torch.tensor(logprobs), teacher_forced_logprobs(served.model, PROBE), atol=1e-2)
        sampled = await stub.Sample(
            rollout_pb2.SampleRequest(
                prompt_tokens=PROBE, num_samples=2, sampling_params=common_pb2.SamplingParams(max_tokens=4, seed=1)
            )
        )
        assert sampled.weight_version == version
    served.model, served.version = new_model, version


def chunk_requests(model, version, chunk_bytes=SMALL_CHUNKS):
    return [
        rollout_pb2.PushWeightsRequest(version=version, chunk=chunk)
        for chunk in encode_chunks(tensors_as_bytes(model.named_parameters()), chunk_bytes)
    ]


def full_digest(model) -> str:
    return digest({t.name: t.data for t in tensors_as_bytes(model.named_parameters())})


async def cut_stream(stub, requests):
    """Send half the chunks, then break the stream from the client side."""

    class Cut(Exception):
        pass

    def half_then_fail():
        yield from requests[: len(requests) // 2]
        raise Cut("client went away")

    with pytest.raises((grpc.aio.AioRpcError, Cut, asyncio.CancelledError)):
        await stub.PushWeights(half_then_fail())


FAILURES = ["cut stream", "bad digest", "missing tensor", "wrong shape", "unknown name", "stale version"]


@pytest.mark.parametrize("failure", FAILURES)
async def test_failed_push_leaves_the_served_weights_untouched(served, failure):
    candidate = perturbed(served.model, seed=2)
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        before, version_before = await served_logprobs(stub)
        version = served.version + 1
        requests = chunk_requests(candidate, version)
        expected_codes = {grpc.StatusCode.INVALID_ARGUMENT}
        commit_digest = full_digest(candidate)

        if failure == "stale version":
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=served.version))
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not newer" in info.value.details()
        else:
            await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=version))
            if failure == "cut stream":
                await cut_stream(stub, requests)
                # Discarded when the server saw the cut, or found incomplete at commit: either way refused.
                expected_codes = {grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT}
            elif failure == "bad digest":
                await stub.PushWeights(iter(requests))
                commit_digest = "0" * 64
            elif failure == "missing tensor":
                dropped = requests[-1].chunk.name
                await stub.PushWeights(iter([r for r in requests if r.chunk.name != dropped]))
            else:
                bad = rollout_pb2.PushWeightsRequest(version=version)
                bad.chunk.CopyFrom(requests[0].chunk)
                if failure == "wrong shape":
                    bad.chunk.shape[:] = [*bad.chunk.shape, 1]
                else:
                    bad.chunk.name = "model.layers.99.mlp.up_proj.weight"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.PushWeights(iter([*requests[:3], bad]))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert ("shape" if failure == "wrong shape" else "unknown parameter") in info.value.details()
                expected_codes = {grpc.StatusCode.FAILED_PRECONDITION}  # the bad stream discarded the update
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.CommitWeightUpdate(
                    rollout_pb2.CommitWeightUpdateRequest(version=version, digest=commit_digest)
                )
            assert info.value.code() in expected_codes, info.value.details()

        after, version_after = await served_logprobs(stub)
        assert after == before, "served weights must be bit-for-bit unchanged"
        assert version_after == version_before == served.version
        assert_serves(after, served.model)


async def test_requests_in_flight_keep_the_old_weights_until_the_swap(served):
    """In-flight swap (the default): tokens before the swap are the old model's and carry the old version;
    tests/rollout/test_inflight_update.py covers the tokens after it and the drain mode."""
    new_model = perturbed(served.model, seed=3)
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        long_request = rollout_pb2.SampleRequest(
            prompt_tokens=PROBE,
            num_samples=1,
            sampling_params=common_pb2.SamplingParams(max_tokens=300, seed=4, ignore_eos=True),
        )
        in_flight = asyncio.ensure_future(stub.Sample(long_request))
        await asyncio.sleep(0.3)
        version = served.version + 1
        await push_weight_update(channel, version, tensors_as_bytes(new_model.named_parameters()))
        old = await in_flight
        assert old.weight_version == served.version
        tokens = list(old.sequences[0].tokens)
        before = list(old.sequences[0].token_weight_versions).count(served.version)
        expected = teacher_forced_logprobs(served.model, PROBE + tokens)[len(PROBE) - 1 :]
        actual = torch.tensor(list(old.sequences[0].logprobs))
        torch.testing.assert_close(actual[:before], expected[:before], atol=TOL, rtol=0)
        fresh = await stub.Sample(long_request)
        assert fresh.weight_version == version
    served.model, served.version = new_model, version


async def test_abort_discards_the_open_update(served):
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        version = served.version + 1
        await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=version))
        await stub.PushWeights(iter(chunk_requests(perturbed(served.model, seed=5), version)))
        await stub.AbortWeightUpdate(rollout_pb2.AbortWeightUpdateRequest(version=version))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CommitWeightUpdate(rollout_pb2.CommitWeightUpdateRequest(version=version))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "aborted" in info.value.details()
        assert_serves((await served_logprobs(stub))[0], served.model)


async def test_load_weights_hot_loads_a_save_weights_directory(served, tiny_model_dir, tmp_path):
    """The directory is written by the learner's own SaveWeights code path."""
    backend = TorchBackend(tiny_model_dir, TorchBackendConfig(device="cpu"), seed=0)
    with torch.no_grad():
        for name, parameter in backend.model.named_parameters():
            parameter.copy_(dict(perturbed(served.model, seed=6).named_parameters())[name])
    directory = write_checkpoint(tmp_path / "weights", backend.save_weights, False, {"kind": "weights"})
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        version = served.version + 2  # versions only need to increase
        reply = await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(directory), version=version))
        assert reply.version == version
        logprobs, reported = await served_logprobs(stub)
        assert reported == version
        assert_serves(logprobs, backend.model)
        served.model, served.version = backend.model, version

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(directory), version=version))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(tmp_path / "nope"), version=version + 1))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        other = tmp_path / "other-model"
        shutil.copytree(directory, other)
        from coordinator.models import resolve_model

        shutil.copy(resolve_model("anvil-small") / "model.safetensors", other / "model.safetensors")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(other), version=version + 1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (await served_logprobs(stub))[1] == version
