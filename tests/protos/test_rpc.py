"""protos.rpc on a real gRPC server on loopback: boot, health, reflection, auth, error mapping, stop."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import errors
from protos.anvil.v1 import (
    common_pb2,
    coordinator_pb2,
    coordinator_pb2_grpc,
    learner_pb2,
    learner_pb2_grpc,
    rollout_pb2,
    rollout_pb2_grpc,
)
from protos.channels import open_channel
from protos.rpc import ServerConfig, ServiceSpec, start_server
from protos.status import error_from_rpc

API_KEY = "test-key-123"


class ProbeLearner(learner_pb2_grpc.LearnerServiceServicer):
    """Raises each domain error from a different RPC so the mapping can be observed on the wire."""

    def __init__(self) -> None:
        self.slow_calls_finished = 0

    async def CreateSession(self, request, context):
        if request.lora_rank > 0:
            raise errors.InvalidArgument("lora_rank must be 0: Anvil trains full parameters only")
        return learner_pb2.CreateSessionResponse(session_id="sess-1")

    async def GetInfo(self, request, context):
        raise errors.NotFound(f"unknown session {request.session_id!r}")

    async def Forward(self, request, context):
        raise errors.FailedPrecondition("seq_id 3 arrived before seq_id 2")

    async def SaveState(self, request, context):
        raise errors.AlreadyExists(f"checkpoint {request.name!r} exists; pass overwrite=true")

    async def CloseSession(self, request, context):
        raise RuntimeError("a bug, not a user error")

    async def OptimStep(self, request, context):
        await asyncio.sleep(0.5)
        self.slow_calls_finished += 1
        return learner_pb2.OptimStepResponse(step=1)


class ProbeRollout(rollout_pb2_grpc.RolloutServiceServicer):
    async def PushWeights(self, request_iterator, context):
        count = 0
        async for request in request_iterator:
            if request.chunk.name == "bad":
                raise errors.InvalidArgument(f"unknown parameter {request.chunk.name!r}")
            count += 1
        return rollout_pb2.PushWeightsResponse(num_chunks=count)


class ProbeCoordinator(coordinator_pb2_grpc.CoordinatorServiceServicer):
    async def StreamMetrics(self, request, context):
        for step in range(2):
            yield coordinator_pb2.StreamMetricsResponse(step=step)
        raise errors.NotFound(f"run {request.run_id!r} vanished")


def specs(learner: ProbeLearner | None = None) -> list[ServiceSpec]:
    return [
        ServiceSpec(
            learner_pb2_grpc.add_LearnerServiceServicer_to_server, learner or ProbeLearner(), "anvil.v1.LearnerService"
        ),
        ServiceSpec(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, ProbeRollout(), "anvil.v1.RolloutService"),
        ServiceSpec(
            coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
            ProbeCoordinator(),
            "anvil.v1.CoordinatorService",
        ),
    ]


@pytest.fixture
async def server():
    running = await start_server(ServerConfig(), specs())
    yield running
    await running.stop(0)


@pytest.fixture
async def auth_server():
    running = await start_server(ServerConfig(api_key=API_KEY), specs())
    yield running
    await running.stop(0)


async def test_binds_a_free_port_and_reports_it(server):
    assert server.port > 0
    assert server.address == f"127.0.0.1:{server.port}"


async def test_health_reports_serving_for_server_and_each_service(server):
    async with open_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", "anvil.v1.LearnerService", "anvil.v1.RolloutService", "anvil.v1.CoordinatorService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="anvil.v1.Nope"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_services(server):
    async with open_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {service.name async for reply in responses for service in reply.list_services_response.service}
    assert {"anvil.v1.LearnerService", "anvil.v1.RolloutService", "anvil.v1.CoordinatorService"} <= names
    assert "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        ("CreateSession", grpc.StatusCode.INVALID_ARGUMENT, "lora_rank must be 0"),
        ("GetInfo", grpc.StatusCode.NOT_FOUND, "unknown session 'nope'"),
        ("Forward", grpc.StatusCode.FAILED_PRECONDITION, "seq_id 3 arrived before seq_id 2"),
        ("SaveState", grpc.StatusCode.ALREADY_EXISTS, "pass overwrite=true"),
        ("CloseSession", grpc.StatusCode.INTERNAL, "internal error: RuntimeError: a bug, not a user error"),
    ],
)
async def test_domain_errors_map_to_statuses(server, call, code, message):
    requests = {
        "CreateSession": learner_pb2.CreateSessionRequest(base_model="anvil-tiny", lora_rank=8),
        "GetInfo": learner_pb2.LearnerServiceGetInfoRequest(session_id="nope"),
        "Forward": learner_pb2.ForwardRequest(session_id="s", seq_id=3),
        "SaveState": learner_pb2.SaveStateRequest(session_id="s", name="ckpt"),
        "CloseSession": learner_pb2.CloseSessionRequest(session_id="s"),
    }
    async with open_channel(server.address) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, call)(requests[call])
    assert info.value.code() == code
    assert message in info.value.details()
    # The server keeps serving after every error.
    async with open_channel(server.address) as channel:
        reply = await learner_pb2_grpc.LearnerServiceStub(channel).CreateSession(learner_pb2.CreateSessionRequest())
    assert reply.session_id == "sess-1"


async def test_error_from_rpc_restores_the_domain_error(server):
    async with open_channel(server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await learner_pb2_grpc.LearnerServiceStub(channel).GetInfo(
                learner_pb2.LearnerServiceGetInfoRequest(session_id="x")
            )
    restored = error_from_rpc(info.value)
    assert isinstance(restored, errors.NotFound)
    assert "unknown session 'x'" in str(restored)


async def test_client_stream_error_maps_to_status(server):
    def chunks(*names):
        return iter(
            rollout_pb2.PushWeightsRequest(version=1, chunk=common_pb2.WeightChunk(name=name)) for name in names
        )

    async with open_channel(server.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        reply = await stub.PushWeights(chunks("a", "b"))
        assert reply.num_chunks == 2
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PushWeights(chunks("a", "bad"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown parameter 'bad'" in info.value.details()


async def test_a_stream_refused_while_the_client_still_writes_keeps_its_status(server):
    """The server refuses the first chunk while the client has many more to send: the client must see the
    server's INVALID_ARGUMENT, not the INTERNAL "Internal error from Core" of a write racing the abort."""
    payload = b"x" * 256 * 1024

    def chunks():
        yield rollout_pb2.PushWeightsRequest(version=1, chunk=common_pb2.WeightChunk(name="bad"))
        for index in range(32):
            chunk = common_pb2.WeightChunk(name=f"w{index}", data=payload)
            yield rollout_pb2.PushWeightsRequest(version=1, chunk=chunk)

    async with open_channel(server.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        refusals = await asyncio.gather(*(stub.PushWeights(chunks()) for _ in range(16)), return_exceptions=True)
    for refusal in refusals:
        assert isinstance(refusal, grpc.aio.AioRpcError)
        assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT, refusal.details()
        assert "unknown parameter 'bad'" in refusal.details()


async def test_server_stream_error_maps_to_status_after_items(server):
    async with open_channel(server.address) as channel:
        stream = coordinator_pb2_grpc.CoordinatorServiceStub(channel).StreamMetrics(
            coordinator_pb2.StreamMetricsRequest(run_id="r1")
        )
        steps = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for message in stream:
                steps.append(message.step)
    assert steps == [0, 1]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "run 'r1' vanished" in info.value.details()


async def test_api_key_is_required_and_checked(auth_server):
    request = learner_pb2.CreateSessionRequest()
    async with open_channel(auth_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await learner_pb2_grpc.LearnerServiceStub(channel).CreateSession(request)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key missing" in info.value.details()
        # Health and reflection stay open without a key.
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with open_channel(auth_server.address, api_key="wrong") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await learner_pb2_grpc.LearnerServiceStub(channel).CreateSession(request)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "API key wrong" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            stream = coordinator_pb2_grpc.CoordinatorServiceStub(channel).StreamMetrics(
                coordinator_pb2.StreamMetricsRequest(run_id="r")
            )
            async for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with open_channel(auth_server.address, api_key=API_KEY) as channel:
        reply = await learner_pb2_grpc.LearnerServiceStub(channel).CreateSession(request)
        assert reply.session_id == "sess-1"
        pushed = await rollout_pb2_grpc.RolloutServiceStub(channel).PushWeights(
            iter([rollout_pb2.PushWeightsRequest(version=1, chunk=common_pb2.WeightChunk(name="w"))])
        )
        assert pushed.num_chunks == 1
        stream = coordinator_pb2_grpc.CoordinatorServiceStub(channel).StreamMetrics(
            coordinator_pb2.StreamMetricsRequest(run_id="r")
        )
        steps = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for message in stream:
                steps.append(message.step)
        assert steps == [0, 1]
        assert info.value.code() == grpc.StatusCode.NOT_FOUND  # authenticated: the handler ran


async def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("ANVIL_API_KEY", "from-env")
    running = await start_server(ServerConfig(), specs())
    try:
        async with open_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await learner_pb2_grpc.LearnerServiceStub(channel).CreateSession(learner_pb2.CreateSessionRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with open_channel(running.address, api_key="from-env") as channel:
            await learner_pb2_grpc.LearnerServiceStub(channel).CreateSession(learner_pb2.CreateSessionRequest())
    finally:
        await running.stop(0)


async def test_message_size_cap_is_enforced():
    running = await start_server(ServerConfig(max_message_bytes=1024), specs())
    try:
        async with open_channel(running.address) as channel:
            stub = learner_pb2_grpc.LearnerServiceStub(channel)
            big = learner_pb2.ForwardRequest(batch=common_pb2.DataBatch(arrow_ipc_stream=b"x" * 4096))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Forward(big)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            small = learner_pb2.ForwardRequest(batch=common_pb2.DataBatch(arrow_ipc_stream=b"x" * 16))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Forward(small)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # reached the handler
    finally:
        await running.stop(0)


async def test_graceful_stop_lets_in_flight_calls_finish():
    learner = ProbeLearner()
    running = await start_server(ServerConfig(), specs(learner))
    async with open_channel(running.address) as channel:
        call = asyncio.ensure_future(
            learner_pb2_grpc.LearnerServiceStub(channel).OptimStep(learner_pb2.OptimStepRequest())
        )
        await asyncio.sleep(0.1)
        await running.stop(grace_s=5)
        reply = await call
    assert reply.step == 1
    assert learner.slow_calls_finished == 1
