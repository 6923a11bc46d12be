"""Samples always come from their sampling client's snapshot, even interleaved across snapshots on one
rollout replica; the legacy JSON wire (older SDKs, Fireworks' fork) works; finishing frees the learner."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.coordinator.gateway.conftest import TINKER_KEY
from tests.coordinator.gateway.test_tinker_sdk import datum, hf_logprobs, random_sequences

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402


async def test_interleaved_samples_from_three_snapshots_use_their_own_weights(stack, service_client, tiny_model_dir):
    training = await service_client.create_lora_training_client_async(base_model="anvil-tiny", rank=0)
    data = [datum(s, weights=[1.0] * (len(s) - 1)) for s in random_sequences(4, seed=31)]
    snapshots = {"base": await service_client.create_sampling_client_async(base_model="anvil-tiny")}
    paths = {"base": tiny_model_dir}
    for name in ("one", "two"):
        await training.forward_backward(data, "cross_entropy")
        await training.optim_step(types.AdamParams(learning_rate=2e-2))
        saved = await training.save_weights_for_sampler(name)
        snapshots[name] = await service_client.create_sampling_client_async(model_path=saved.path)
        with stack.as_tenant():
            record = stack.gateway.service.checkpoints.get(saved.path)
        paths[name] = record.local_path
    prompt = [4, 40, 405, 226, 28]
    loads_before = stack.gateway.service.router.loads
    order = ["base", "one", "two", "one", "base", "two", "two", "base", "one"]
    responses = await asyncio.gather(
        *(
            snapshots[name].sample_async(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=4))
            for name in order
        )
    )
    assert stack.gateway.service.router.loads > loads_before  # one replica: the router had to swap
    models = {n: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for n, p in paths.items()}
    for name, response in zip(order, responses, strict=True):
        for sequence in response.sequences:
            expected = hf_logprobs(models[name], prompt + list(sequence.tokens))[len(prompt) - 1 :]
            np.testing.assert_allclose(sequence.logprobs, expected.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_legacy_json_forward_backward_and_results(stack, service_client, tiny_model_dir):
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    model_id = training.get_info().model_id
    tokens = [7, 8, 9, 10, 11]
    body = {
        "model_id": model_id,
        "seq_id": 1,
        "forward_input": {
            "loss_fn": "cross_entropy",
            "loss_fn_config": {},
            "data": [
                {
                    "model_input": {"chunks": [{"type": "encoded_text", "tokens": tokens[:-1]}]},
                    "loss_fn_inputs": {
                        "target_tokens": {"data": tokens[1:], "dtype": "int64", "shape": [4]},
                        "weights": {"data": [1.0, 1.0, 0.0, 1.0], "dtype": "float32", "shape": [4]},
                    },
                }
            ],
        },
    }
    with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=60) as client:
        request_id = client.post("/api/v1/forward", json=body).json()["request_id"]
        while (reply := client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()).get(
            "type"
        ) == "try_again":
            pass
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected = hf_logprobs(model, tokens).detach().numpy()
    output = reply["loss_fn_outputs"][0]["logprobs"]
    assert output["shape"] == [4] and output["dtype"] == "float32"
    np.testing.assert_allclose(output["data"], expected, rtol=1e-4, atol=1e-4)
    assert reply["metrics"]["loss:sum"] == pytest.approx(-float(expected[[0, 1, 3]].sum()), rel=1e-4)


def test_finishing_a_session_frees_its_learner_sessions(stack):
    before = len(stack.learner.sessions._sessions)
    client = tinker.ServiceClient(base_url=stack.base_url, api_key=TINKER_KEY)
    client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    assert len(stack.learner.sessions._sessions) == before + 1
    client.close("success").result()
    assert len(stack.learner.sessions._sessions) == before
