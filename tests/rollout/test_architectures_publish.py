"""The Qwen3 built-ins (dense, and Mixture-of-Experts) served and updated: the learner trains a step and
publishes by stream; the rollout (vLLM's CPU build, and the torch engine) scores a sequence with logprobs
equal to the learner's on the new weights. For the MoE this carries every expert under the per-expert
checkpoint names vLLM loads (the learner's fused experts split: protos/checkpoint_names.py), and vLLM's
CPU MoE repacks them on reload."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from coordinator.models import resolve_model
from learner.server import start_learner
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from tests.learner.client import LearnerTestClient, random_rows
from tests.rollout.conftest import start_process, stop_process

TOKENS = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5, 30, 31, 2]


@pytest.fixture(params=["anvil-tiny-moe", "anvil-tiny-qwen3"])
def model(request) -> str:
    return request.param


def serve(engine: str, model: str):
    command = [str(Path(sys.executable).parent / "anvil"), "rollout", "--set", "server.port=0", "--model", model]
    command += ["--config", "configs/rollout.toml"] if engine == "vllm" else ["--set", 'engine.type="torch"']
    process, address = start_process(command, engine)
    yield address
    assert stop_process(process) == 0


@pytest.fixture
def rollout_of_model(engine, model):
    yield from serve(engine, model)


@pytest.fixture
def deepseek_on_torch_engine():
    """DeepSeek-V3 on the torch engine only: vLLM's CPU MLA attention gives wrong logprobs (docs/architecture.md)."""
    yield from serve("torch", "anvil-tiny-deepseek")


async def scored(address: str) -> tuple[list[float], int]:
    async with open_channel(address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        reply = await stub.ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=TOKENS))
        return list(reply.logprobs), reply.weight_version


async def test_trained_weights_reach_the_rollout_with_logprob_parity(learner_config, rollout_of_model, model):
    await assert_publish_parity(learner_config, rollout_of_model, model)


async def test_deepseek_v3_router_bias_and_experts_reach_the_torch_engine(learner_config, deepseek_on_torch_engine):
    await assert_publish_parity(learner_config, deepseek_on_torch_engine, "anvil-tiny-deepseek")


async def assert_publish_parity(learner_config, rollout_of_model: str, model: str) -> None:
    """Served logprobs equal the learner's before a step, and again after it is published by stream."""
    learner_config.models[model] = resolve_model(model)
    running, servicer = await start_learner(learner_config)
    try:
        async with open_channel(running.address) as channel:
            client = await LearnerTestClient.create(channel, servicer, base_model=model)
            row = {"model_input": TOKENS[:-1], "target_tokens": TOKENS[1:], "weights": [1.0] * (len(TOKENS) - 1)}
            before, _ = await client.forward([row])
            served, version = await scored(rollout_of_model)
            assert version == 0
            np.testing.assert_allclose(served, before[0], atol=1e-4)

            await client.forward_backward(random_rows(512))
            await client.optim_step(learning_rate=1e-2)
            reply = await client.publish([rollout_of_model])
            assert reply.version == 1
            after, _ = await client.forward([row])
            assert np.abs(after[0] - before[0]).max() > 1e-2, "the step moved the model"
            served, version = await scored(rollout_of_model)
            assert version == 1
            np.testing.assert_allclose(served, after[0], atol=1e-4)
    finally:
        await running.stop(0)
