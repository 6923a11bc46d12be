"""The Node.js client (clients/node) drives a real RL step over anvil.v1, and Python checks it independently.

`node src/rl_step.js` runs against the learner and rollout processes of conftest.py: it samples, builds the
Arrow batch in JavaScript, trains one importance_sampling step, publishes, samples again, and sends bad
batches; it checks each stage itself and writes what it measured (report.json) and the batch it built.
These tests then recompute what matters without trusting the JavaScript side: the batch read by pyarrow,
the logprobs before the step from the base model in transformers, the logprobs after the step from the
rollout (which serves the published weights), and the direction of the change against the advantages.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.arrow_schemas import BATCH_SCHEMA
from protos.batch_validation import validate_batch
from protos.channels import open_channel
from tests.clients.conftest import Servers, require_tool

# float32 logprobs computed by two processes (and two code paths) agree to this; the step moves them by
# ~1e-1 nats at the client's default learning rate, three orders of magnitude more.
LOGPROB_ATOL = 1e-4

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class NodeRun:
    report: dict
    batch: pa.Table
    stdout: str


@pytest.fixture(scope="module")
def node_run(node_client: Path, servers: Servers, tmp_path_factory: pytest.TempPathFactory) -> NodeRun:
    out = tmp_path_factory.mktemp("node-run")
    command = [
        require_tool("node"), "src/rl_step.js", "--learner", servers.learner, "--rollout", servers.rollout,
        "--api-key", servers.api_key, "--report", str(out / "report.json"), "--batch-out", str(out / "batch.arrows"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=node_client, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"the Node client failed:\n{result.stdout}\n{result.stderr}"
    assert result.stdout.rstrip().endswith("OK"), result.stdout
    with pa.ipc.open_stream((out / "batch.arrows").read_bytes()) as reader:
        batch = reader.read_all()
    return NodeRun(json.loads((out / "report.json").read_text()), batch, result.stdout)


def test_javascript_unit_tests_pass(node_client: Path):
    result = subprocess.run(
        [require_tool("node"), "--test", "test/"], cwd=node_client, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout


def test_javascript_is_formatted(node_client: Path):
    """The JavaScript is held to a formatter as the Python is to ruff (`npm run format` fixes it)."""
    prettier = node_client / "node_modules" / ".bin" / "prettier"
    result = subprocess.run([str(prettier), "--check", "src", "test"], cwd=node_client, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_javascript_column_table_matches_the_contract(node_client: Path, tmp_path: Path):
    """A batch with every column the JS client knows has exactly BATCH_SCHEMA's names and types."""
    path = tmp_path / "every-column.arrows"
    subprocess.run([require_tool("node"), "src/schema_example.js", str(path)], cwd=node_client, check=True)
    with pa.ipc.open_stream(path.read_bytes()) as reader:
        table = reader.read_all()
    assert table.schema.names == BATCH_SCHEMA.names
    for field in table.schema:
        expected = BATCH_SCHEMA.field(field.name).type
        actual = field.type.value_type if pa.types.is_list(field.type) else field.type
        assert actual == (expected.value_type if pa.types.is_list(expected) else expected), field.name
    validate_batch(table, vocab_size=16)


def test_api_key_is_required_from_javascript(node_run: NodeRun):
    auth = node_run.report["auth"]
    assert set(auth) == {"learner_without_key", "learner_wrong_key", "rollout_without_key"}
    for case, outcome in auth.items():
        assert outcome["status"] == "UNAUTHENTICATED", case
    assert "missing" in auth["learner_without_key"]["details"]
    assert "wrong" in auth["learner_wrong_key"]["details"]


def test_batch_built_in_javascript_is_a_valid_trajectory_batch(node_run: NodeRun, servers: Servers):
    batch, report = node_run.batch, node_run.report
    assert [str(field.type) for field in batch.schema] == [
        "list<item: int32>", "list<item: int32>", "list<item: float>", "list<item: float>", "int64", "int64", "float",
    ]  # fmt: skip
    assert batch.schema.names == [
        "model_input", "target_tokens", "logprobs", "advantages", "sampler_version", "group_id", "reward",
    ]  # fmt: skip
    validate_batch(batch, vocab_size=servers.vocab_size)
    rows = batch.to_pylist()
    assert len(rows) == len(report["rows"]) == 4
    prompt_targets = len(report["prompt_tokens"]) - 1  # positions whose target is still a prompt token
    for row, sent in zip(rows, report["rows"], strict=True):
        assert row["model_input"] == sent["model_input"] and row["target_tokens"] == sent["target_tokens"]
        assert row["model_input"][: prompt_targets + 1] == report["prompt_tokens"]
        assert row["model_input"][1:] == row["target_tokens"][:-1]  # targets are the inputs shifted by one
        assert row["advantages"][:prompt_targets] == [0.0] * prompt_targets == row["logprobs"][:prompt_targets]
        assert len(set(row["advantages"][prompt_targets:])) == 1  # one advantage for the whole completion
        assert row["sampler_version"] == report["version_before"] == 0
    advantages = [row["advantages"][-1] for row in rows]
    rewards = [row["reward"] for row in rows]
    np.testing.assert_allclose(advantages, np.array(rewards) - np.mean(rewards), atol=1e-6)


async def test_learner_step_from_javascript_moves_logprobs_toward_the_advantages(
    node_run: NodeRun, servers: Servers, tiny_model_dir: Path
):
    """Before: the base model in transformers. After: the rollout serving the published weights. Neither
    is the learner that trained, and neither is computed in JavaScript."""
    rows = node_run.batch.to_pylist()
    before = base_model_logprobs(tiny_model_dir, rows)
    after, served_version = await rollout_logprobs(servers, rows)
    report = node_run.report
    assert served_version == report["publish"]["version"] == report["optim_step"]["step"] == 1

    for mine, theirs in [(before, report["logprobs_before"]), (after, report["logprobs_after"])]:
        for row_mine, row_theirs in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(row_theirs, row_mine, atol=LOGPROB_ATOL)
    completion = slice(len(report["prompt_tokens"]) - 1, None)
    for row, lp in zip(rows, before, strict=True):  # the sampler's logprobs in the batch are the base model's
        np.testing.assert_allclose(np.array(row["logprobs"])[completion], lp[completion], atol=1e-3)

    advantages = [np.array(row["advantages"]) for row in rows]
    deltas = [lp_after - lp_before for lp_before, lp_after in zip(before, after, strict=True)]
    objective_change = sum(float(np.dot(a, d)) for a, d in zip(advantages, deltas, strict=True))
    assert objective_change > 0  # the importance_sampling objective, to first order, went up
    np.testing.assert_allclose(objective_change, report["shift"]["objectiveChange"], rtol=1e-2)
    rewarded = np.concatenate([d[a > 0] for a, d in zip(advantages, deltas, strict=True)])
    penalised = np.concatenate([d[a < 0] for a, d in zip(advantages, deltas, strict=True)])
    assert rewarded.size and penalised.size
    assert rewarded.mean() > penalised.mean()  # rewarded tokens gained on the penalised ones


def test_rollout_serves_the_published_version(node_run: NodeRun, servers: Servers):
    report = node_run.report
    assert report["version_after"] == report["publish"]["version"] > report["version_before"]
    assert report["publish"]["num_bytes"] > 0


def test_bad_batches_from_javascript_are_rejected_naming_the_column(node_run: NodeRun):
    rejections = {r["case"]: r for r in node_run.report["rejections"]}
    assert set(rejections) == {
        "advantages as list<float64>", "model_input as list<int64>", "ragged advantages in row 1",
    }  # fmt: skip
    for rejection in rejections.values():
        assert rejection["status"] == "INVALID_ARGUMENT"
        assert f"column '{rejection['column']}'" in rejection["details"]
    assert "expected list<item: float>" in rejections["advantages as list<float64>"]["details"]
    assert "row 1" in rejections["ragged advantages in row 1"]["details"]
    # The learner kept serving: the same step, and (checked in JS) the same logprobs as right after the step.
    assert node_run.report["step_after_rejections"] == node_run.report["optim_step"]["step"]


def base_model_logprobs(model_dir: Path, rows: list[dict]) -> list[np.ndarray]:
    """log p(target_t | model_input[:t+1]) under the base weights, straight from transformers."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = []
    with torch.no_grad():
        for row in rows:
            logits = model(torch.tensor([row["model_input"]])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            result.append(logprobs.gather(1, torch.tensor(row["target_tokens"])[:, None])[:, 0].numpy())
    return result


async def rollout_logprobs(servers: Servers, rows: list[dict]) -> tuple[list[np.ndarray], int]:
    """The rollout's ComputeLogprobs of each row's full token sequence (tokens 1..n-1 = the row's targets)."""
    async with open_channel(servers.rollout, servers.api_key) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        replies = [
            await stub.ComputeLogprobs(
                rollout_pb2.ComputeLogprobsRequest(tokens=[row["model_input"][0], *row["target_tokens"]])
            )
            for row in rows
        ]
    versions = {reply.weight_version for reply in replies}
    assert len(versions) == 1, versions
    return [np.array(reply.logprobs) for reply in replies], versions.pop()


async def test_the_servers_refuse_calls_without_the_key(servers: Servers):
    """Auth is really on for these servers, so the key the JS client sends is what lets it in."""
    async with open_channel(servers.rollout) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await rollout_pb2_grpc.RolloutServiceStub(channel).GetInfo(rollout_pb2.RolloutServiceGetInfoRequest())
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
