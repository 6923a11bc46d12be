"""Property tests (hypothesis) of every unary request type of the learner and rollout services, against
real servers on loopback: messages built from each request's protobuf descriptor with any field values
(ids that exist and ids that do not, negative and huge numbers, odd strings, random bytes, nested
messages), and raw bytes that are no message at all. Every call either succeeds or fails with a status a
client can act on (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) and a message - never INTERNAL
or UNKNOWN, which is what an unhandled exception becomes - and the servers keep serving afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learner.config import LearnerConfig
from learner.server import start_learner
from protos.anvil.v1 import learner_pb2, rollout_pb2
from protos.arrow_schemas import encode_batch, make_batch
from protos.channels import open_channel
from protos.rpc import ServerConfig
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout
from tests.coordinator.conftest import ThreadedServers

KEY = "fuzz-key"
ACTIONABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE,  # a PublishWeights target that does not answer
    grpc.StatusCode.DEADLINE_EXCEEDED,  # a seq_id waiting for an earlier one
}
FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
SKIPPED = {"PushWeights"}  # the client-streaming weight push: fuzzed chunk by chunk in test_fuzz_decoders.py

_INTS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly small and edge values (where bugs are), sometimes anything in range."""
    edges = [v for v in (low, high, -1, 0, 1, 2, 3, 7, 64, 10**6) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _scalar(field: FieldDescriptor, known: dict[str, list]) -> st.SearchStrategy:
    if field.name in known:  # ids and names the servers know, half of the time
        return st.one_of(st.sampled_from(known[field.name]), _scalar_of_type(field))
    return _scalar_of_type(field)


def _scalar_of_type(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind in _INTS:
        return _integers(*_INTS[kind])
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e-3]), st.floats(allow_nan=True, width=32))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(st.sampled_from(["", "anvil-tiny", "../../etc", "a/b", "x" * 300]), st.text(max_size=20))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_ENUM:
        return _integers(-1, 8)
    raise AssertionError(f"unhandled field type {kind} of {field.full_name}")


@st.composite
def messages(draw, descriptor, known: dict[str, list], depth: int = 0):
    """A message of `descriptor` with any subset of its fields set to any values."""
    values = {}
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 2 or field.message_type.GetOptions().map_entry:
                continue
            item = messages(field.message_type, known, depth + 1)
        else:
            item = _scalar(field, known)
        if field.is_repeated:
            values[field.name] = draw(st.lists(item, max_size=3))
        else:
            values[field.name] = draw(item)
    message = descriptor._concrete_class()
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            target = getattr(message, name)
            for part in value if isinstance(value, list) else [value]:
                (target.add() if isinstance(value, list) else target).CopyFrom(part)
        elif isinstance(value, list):
            getattr(message, name).extend(value)
        else:
            setattr(message, name, value)
    return message


class Fuzzed:
    def __init__(self, tmp: Path, model_dir: Path) -> None:
        self.threaded = ThreadedServers()
        learner_config = LearnerConfig(
            server=ServerConfig(api_key=KEY),
            checkpoint_dir=tmp / "learner",
            max_sessions=4,
            models={"anvil-tiny": model_dir},
            sequence_gap_timeout_s=0.2,  # a seq_id far ahead fails at once with DEADLINE_EXCEEDED
            max_batch_rows=8,
        )
        rollout_config = RolloutConfig(
            model=model_dir,
            model_name="anvil-tiny",
            server=ServerConfig(api_key=KEY),
            engine=TorchEngineConfig(device="cpu"),
            max_samples_per_request=16,
        )
        self.learner, _ = self.threaded.start(start_learner(learner_config))
        self.rollout, _ = self.threaded.start(start_rollout(rollout_config))
        self.session = self.call(self.learner, "LearnerService", "CreateSession",
                                 learner_pb2.CreateSessionRequest(base_model="anvil-tiny")).session_id  # fmt: skip
        self.known = {
            "session_id": [self.session],
            "base_model": ["anvil-tiny"],
            "targets": [f"{self.rollout}"],
            "address": [self.rollout, "127.0.0.1:1"],
        }

    def call(self, address: str, service: str, method: str, request, raw: bool = False):
        async def go():
            async with open_channel(address, api_key=KEY) as channel:
                stub = channel.unary_unary(
                    f"/anvil.v1.{service}/{method}",
                    request_serializer=None if raw else type(request).SerializeToString,
                    response_deserializer=None,
                )
                return await stub(request, timeout=30)

        response = asyncio.run_coroutine_threadsafe(go(), self.threaded.loop).result(120)
        if raw:
            return response
        output = self.descriptor(service, method).output_type._concrete_class()
        output.ParseFromString(response)
        return output

    @staticmethod
    def descriptor(service: str, method: str):
        module = learner_pb2 if service == "LearnerService" else rollout_pb2
        return module.DESCRIPTOR.services_by_name[service].methods_by_name[method]


@pytest.fixture(scope="module")
def fuzzed(tiny_model_dir: Path, tmp_path_factory) -> Iterator[Fuzzed]:
    servers = Fuzzed(tmp_path_factory.mktemp("fuzz-grpc"), tiny_model_dir)
    yield servers
    servers.threaded.close()


def test_request_size_limits_are_clear_errors(fuzzed: Fuzzed):
    """A batch with more rows, or a Sample with more samples, than the server takes: INVALID_ARGUMENT naming
    the limit and its setting (the default limits are larger; these servers are configured small). Runs
    before the fuzzing, which may fill the learner's sessions."""
    rows = [{"model_input": [5, 6, 7], "target_tokens": [6, 7, 8], "weights": [1.0, 1.0, 1.0]}] * 9
    fresh = fuzzed.call(fuzzed.learner, "LearnerService", "CreateSession",
                        learner_pb2.CreateSessionRequest(base_model="anvil-tiny")).session_id  # fmt: skip
    request = learner_pb2.ForwardRequest(session_id=fresh, seq_id=1, loss_fn="cross_entropy")
    request.batch.arrow_ipc_stream = encode_batch(make_batch(rows))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        fuzzed.call(fuzzed.learner, "LearnerService", "Forward", request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "9 rows" in refused.value.details() and "max_batch_rows" in refused.value.details()
    sample = rollout_pb2.SampleRequest(prompt_tokens=[5, 6, 7], num_samples=17)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        fuzzed.call(fuzzed.rollout, "RolloutService", "Sample", sample)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 16" in refused.value.details() and "max_samples_per_request" in refused.value.details()


def _methods() -> list[tuple[str, str]]:
    return [
        (service.name, method.name)
        for module in (learner_pb2, rollout_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
        if not method.client_streaming and not method.server_streaming and method.name not in SKIPPED
    ]


def _assert_actionable(fuzzed: Fuzzed, service: str, method: str, request, raw: bool = False) -> None:
    address = fuzzed.learner if service == "LearnerService" else fuzzed.rollout
    try:
        fuzzed.call(address, service, method, request, raw=raw)
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in ACTIONABLE, f"{method}({request!r}) -> {exc.code().name}: {exc.details()}"
        assert exc.details(), f"{method}({request!r}) -> {exc.code().name} without a message"


@pytest.mark.parametrize(("service", "method"), _methods())
def test_every_request_type_gets_an_actionable_answer(fuzzed: Fuzzed, service: str, method: str):
    descriptor = Fuzzed.descriptor(service, method).input_type

    @FUZZ
    @given(request=messages(descriptor, fuzzed.known), garbage=st.binary(min_size=1, max_size=64))
    def check(request, garbage):
        _assert_actionable(fuzzed, service, method, request)
        _assert_actionable(fuzzed, service, method, garbage, raw=True)

    check()


def test_the_servers_serve_on_after_the_fuzzing(fuzzed: Fuzzed):
    """Runs last in this module: the learner answers (a new session, or - the fuzzing opened sessions - the
    exact reason there is none) and the replica still samples."""
    try:
        new = fuzzed.call(fuzzed.learner, "LearnerService", "CreateSession",
                          learner_pb2.CreateSessionRequest(base_model="anvil-tiny"))  # fmt: skip
        assert new.session_id
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION and "max_sessions=4" in exc.details()
    info = fuzzed.call(fuzzed.rollout, "RolloutService", "GetInfo", rollout_pb2.RolloutServiceGetInfoRequest())
    assert info.base_model == "anvil-tiny"
    sample = rollout_pb2.SampleRequest(prompt_tokens=[5, 6, 7], num_samples=2)
    sample.sampling_params.max_tokens = 3
    assert len(fuzzed.call(fuzzed.rollout, "RolloutService", "Sample", sample).sequences) == 2
