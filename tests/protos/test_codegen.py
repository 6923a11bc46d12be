"""The committed stubs are exactly what scripts/gen_protos.py generates, and they import as a package."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen_protos():
    spec = importlib.util.spec_from_file_location("gen_protos", REPO_ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def proto_copy(tmp_path: Path) -> Path:
    shutil.copytree(REPO_ROOT / "protos" / "anvil", tmp_path / "anvil")
    return tmp_path


def test_committed_stubs_are_current():
    result = subprocess.run(
        [sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_fails_on_a_hand_edited_stub(gen_protos, proto_copy):
    assert gen_protos.check(proto_copy) == 0
    stub = proto_copy / "anvil" / "v1" / "learner_pb2_grpc.py"
    stub.write_text(stub.read_text() + "\n# a hand edit\n")
    assert gen_protos.check(proto_copy) == 1


def test_check_fails_when_a_proto_changes_without_regenerating(gen_protos, proto_copy):
    proto = proto_copy / "anvil" / "v1" / "common.proto"
    proto.write_text(proto.read_text().replace("  bool ignore_eos = 8;", "  bool ignore_eos = 8;\n  bool echo = 9;"))
    assert gen_protos.check(proto_copy) == 1


def test_stubs_import_relatively_and_carry_every_rpc():
    from protos.anvil.v1 import coordinator_pb2_grpc, learner_pb2, learner_pb2_grpc, rollout_pb2_grpc

    assert learner_pb2.DESCRIPTOR.package == "anvil.v1"
    for stub, rpcs in [
        (
            learner_pb2_grpc.LearnerServiceStub,
            "CreateSession CloseSession GetInfo Forward ForwardBackward OptimStep SaveState LoadState "
            "SaveWeights PublishWeights",
        ),
        (
            rollout_pb2_grpc.RolloutServiceStub,
            "GetInfo Sample ComputeLogprobs BeginWeightUpdate PushWeights CommitWeightUpdate LoadWeights",
        ),
        (
            coordinator_pb2_grpc.CoordinatorServiceStub,
            "StartRun GetRun StreamMetrics StopRun CreateTrainer CreateDeployment HotLoad",
        ),
    ]:
        service = stub.__name__.removesuffix("Stub")
        descriptor = learner_pb2.DESCRIPTOR.pool.FindServiceByName(f"anvil.v1.{service}")
        assert set(rpcs.split()) <= {method.name for method in descriptor.methods}


def test_every_rpc_documents_its_error_codes():
    """Each rpc's doc comment lists its errors ("Errors include:"), as the contract requires."""
    for proto in (REPO_ROOT / "protos" / "anvil" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.strip().startswith("rpc "):
                comment = []
                cursor = index - 1
                while cursor >= 0 and lines[cursor].strip().startswith("//"):
                    comment.append(lines[cursor])
                    cursor -= 1
                assert any("Errors include:" in c for c in comment), f"{proto.name}: {line.strip()}"
