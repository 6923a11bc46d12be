"""Server reflection makes the contract discoverable without the .proto files: from Python's reflection
client, and from grpcurl (the tool docs/grpc.md's session uses). Reflection and health stay open when auth
is on; every other call needs the key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.anvil.v1 import learner_pb2, rollout_pb2
from tests.clients.conftest import Servers, missing_external_tool
from tests.clients.grpcurl import find_or_fetch_grpcurl

pytestmark = pytest.mark.integration

OPEN_SERVICES = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


def served_contract(servers: Servers) -> dict[str, tuple[str, object]]:
    """address -> (the anvil.v1 service it must serve, that service's compiled descriptor)."""
    return {
        servers.learner: ("anvil.v1.LearnerService", learner_pb2.DESCRIPTOR.services_by_name["LearnerService"]),
        servers.rollout: ("anvil.v1.RolloutService", rollout_pb2.DESCRIPTOR.services_by_name["RolloutService"]),
    }


def test_python_reflection_client_lists_and_describes_the_services_without_a_key(servers: Servers):
    for address, (service, compiled) in served_contract(servers).items():
        with grpc.insecure_channel(address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            assert set(database.get_services()) == {service, *OPEN_SERVICES}
            reflected = DescriptorPool(database).FindServiceByName(service)
            assert [(m.name, m.input_type.full_name, m.output_type.full_name) for m in reflected.methods] == [
                (m.name, m.input_type.full_name, m.output_type.full_name) for m in compiled.methods
            ]
            batch = DescriptorPool(database).FindMessageTypeByName("anvil.v1.DataBatch")
            assert batch.fields_by_name["arrow_ipc_stream"].type == FieldDescriptor.TYPE_BYTES


@pytest.fixture(scope="module")
def grpcurl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return find_or_fetch_grpcurl(tmp_path_factory.mktemp("grpcurl"))
    except RuntimeError as why:
        missing_external_tool(str(why))


def run_grpcurl(grpcurl: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(grpcurl), "-plaintext", *args], capture_output=True, text=True, timeout=120)


def test_grpcurl_lists_the_anvil_services(grpcurl: Path, servers: Servers):
    for address, (service, compiled) in served_contract(servers).items():
        listed = run_grpcurl(grpcurl, address, "list")
        assert listed.returncode == 0, listed.stderr
        assert set(listed.stdout.split()) == {service, *OPEN_SERVICES}
        described = run_grpcurl(grpcurl, address, "describe", service)
        assert described.returncode == 0, described.stderr
        for method in compiled.methods:
            assert f"rpc {method.name} (" in described.stdout


def test_grpcurl_calls_need_the_key(grpcurl: Path, servers: Servers):
    method = "anvil.v1.RolloutService/GetInfo"
    refused = run_grpcurl(grpcurl, servers.rollout, method)
    assert refused.returncode != 0 and "Code: Unauthenticated" in refused.stdout + refused.stderr
    header = f"authorization: Bearer {servers.api_key}"
    answered = run_grpcurl(grpcurl, "-H", header, "-d", "{}", servers.rollout, method)
    assert answered.returncode == 0, answered.stderr
    info = json.loads(answered.stdout)
    assert info["engine"] == servers.engine and info["vocab_size"] == servers.vocab_size
    probe = '{"service": "anvil.v1.LearnerService"}'
    health = run_grpcurl(grpcurl, "-d", probe, servers.learner, "grpc.health.v1.Health/Check")  # open, no key
    assert json.loads(health.stdout) == {"status": "SERVING"}
