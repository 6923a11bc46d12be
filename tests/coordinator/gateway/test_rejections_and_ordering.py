"""Bad input through the SDK is a clear error on the client and the session keeps working; retried and
out-of-order submits execute exactly once, in seq_id order; auth; session expiry."""

from __future__ import annotations

import time

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.coordinator.gateway.conftest import TINKER_KEY, build_stack, stop_stack
from tests.coordinator.gateway.test_tinker_sdk import GRAD_TOL, datum, hf_logprobs, learner_gradients

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402
from tinker.proto import tinker_public_pb2 as sdk_pb  # noqa: E402

USER_ERRORS = (tinker.RequestFailedError, ValueError)


def still_trains(training) -> None:
    out = training.forward_backward([datum([5, 6, 7, 8], weights=[1.0, 1.0, 1.0])], "cross_entropy").result()
    assert out.metrics["loss:sum"] > 0


def test_lora_rank_is_refused_with_the_fix(service_client):
    with pytest.raises(USER_ERRORS, match=r"full-parameter.*rank=0"):
        service_client.create_lora_training_client(base_model="anvil-tiny", rank=8).result()
    still_trains(service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result())


def test_unknown_base_model(service_client):
    with pytest.raises(USER_ERRORS, match="serves 'anvil-tiny'"):
        service_client.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=0).result()


def test_bad_losses_and_data_are_user_errors_and_the_client_keeps_working(service_client):
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    good = datum([5, 6, 7, 8], weights=[1.0, 1.0, 1.0])
    with pytest.raises(tinker.RequestFailedError, match="unknown loss_fn 'nope'"):
        training.forward_backward([good], "nope").result()
    with pytest.raises(tinker.RequestFailedError, match="importance_sampling"):
        training.forward_backward([datum([5, 6, 7], logprobs=[0.0, 0.0], advantages=[1.0, 1.0])],
                                  "stable_reinforce").result()  # fmt: skip
    malformed = types.Datum(
        model_input=types.ModelInput.from_ints([5, 6, 7]),
        loss_fn_inputs={"target_tokens": [6, 7], "weights": [1.0, 1.0]},
    )
    with pytest.raises(tinker.RequestFailedError, match="target_tokens"):
        training.forward_backward([malformed], "cross_entropy").result()
    with pytest.raises(tinker.RequestFailedError, match="needs batch column"):
        training.forward_backward([datum([5, 6, 7], weights=[1.0, 1.0])], "ppo").result()
    out_of_vocab = datum([5, 6, 100000], weights=[1.0, 1.0])
    with pytest.raises(tinker.RequestFailedError, match="target_tokens"):
        training.forward_backward([out_of_vocab], "cross_entropy").result()
    still_trains(training)
    training.optim_step(types.AdamParams(learning_rate=1e-4)).result()

    # checkpoints: unknown path, wrong kind, duplicate name without overwrite
    with pytest.raises(USER_ERRORS, match="no checkpoint"):
        service_client.create_training_client_from_state("tinker://nobody:train:0/weights/missing").result()
    with pytest.raises(USER_ERRORS, match="not a checkpoint path"):
        service_client.create_training_client_from_state("tinker://too/many/segments/here").result()
    training.save_state("dup").result()
    with pytest.raises(tinker.RequestFailedError, match="already exists"):
        training.save_state("dup").result()
    sampler_path = training.save_weights_for_sampler("servable").result().path
    with pytest.raises(USER_ERRORS, match="sampler weights only"):
        service_client.create_training_client_from_state(sampler_path).result()
    still_trains(training)


def test_stable_reinforce_sampling_is_refused_at_the_first_sample(service_client):
    """The cookbook's async default samples with record_stability_info=True for stable_reinforce: the first
    sample is refused with the fix, before a step of rollouts is spent; the client's other samplers work."""
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    stable = training.save_weights_and_get_sampling_client(record_stability_info=True).result()
    prompt, params = types.ModelInput.from_ints([4, 5]), types.SamplingParams(max_tokens=2)
    with pytest.raises(tinker.BadRequestError, match=r"record_stability_info=False.*importance_sampling"):
        stable.sample(prompt, 1, params).result()
    plain = training.save_weights_and_get_sampling_client().result()
    assert len(plain.sample(prompt, 2, params).result().sequences) == 2


def test_sampling_rejections(service_client):
    sampler = service_client.create_sampling_client(base_model="anvil-tiny").result()
    with pytest.raises(tinker.RequestFailedError, match="topk_sample_logprobs"):
        sampler.sample(types.ModelInput.from_ints([4, 5]), 1, types.SamplingParams(max_tokens=2),
                       include_prompt_logprobs=True, topk_sample_logprobs=3).result()  # fmt: skip
    response = sampler.sample(types.ModelInput.from_ints([4, 5]), 1, types.SamplingParams(max_tokens=2)).result()
    assert len(response.sequences[0].tokens) <= 2


def _submit(client: httpx.Client, model_id: str, seq_id: int, sequences: list[list[int]]) -> str:
    request = sdk_pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id, loss_fn="cross_entropy")
    for tokens in sequences:
        item = request.data.add()
        item.model_input.add().encoded_text.tokens = np.asarray(tokens[:-1], dtype=np.int32).tobytes()
        for key, values, dtype, code in (
            ("target_tokens", tokens[1:], np.int64, sdk_pb.DTYPE_INT64),
            ("weights", [1.0] * (len(tokens) - 1), np.float32, sdk_pb.DTYPE_FLOAT32),
        ):
            tensor = item.loss_fn_inputs[key]
            tensor.dense, tensor.dtype = np.asarray(values, dtype=dtype).tobytes(), code
            tensor.shape.append(len(values))
    reply = client.post(
        "/api/v1/forward_backward",
        content=request.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
    )
    reply.raise_for_status()
    return reply.json()["request_id"]


def _result(client: httpx.Client, request_id: str) -> httpx.Response:
    while True:
        reply = client.post(
            "/api/v1/retrieve_future",
            json={"request_id": request_id, "allow_metadata_only": False},
            headers={"Accept": "application/x-protobuf, application/json"},
        )
        if reply.headers["content-type"].startswith("application/x-protobuf") or "try_again" not in reply.text:
            return reply


def test_retried_and_early_submits_execute_once_in_order(stack, service_client):
    """seq 2 arrives before seq 1 and is retried; seq 1 is retried too: each runs exactly once."""
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    model_id = training.get_info().model_id
    first, second = [[5, 6, 7, 8]], [[9, 10, 11], [12, 13, 14, 15, 16]]
    with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=60) as client:
        early = _submit(client, model_id, 2, second)
        assert _submit(client, model_id, 2, second) == early  # a retry of a buffered request
        time.sleep(0.3)
        request_1 = _submit(client, model_id, 1, first)
        assert _submit(client, model_id, 1, first) == request_1  # a retry of a running/finished request
        for request_id in (request_1, early):
            output = sdk_pb.ForwardBackwardOutput.FromString(_result(client, request_id).content)
            assert output.metrics["loss:sum"] > 0
        assert _submit(client, model_id, 1, first) == request_1  # a late retry: the same result, no re-run
        reused = client.post(
            "/api/v1/optim_step", json={"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}}
        )
        assert reused.status_code == 400 and "already used by a different request" in reused.json()["detail"]

    model = AutoModelForCausalLM.from_pretrained(stack.gateway.service.model_dir, dtype=torch.float32)
    total = sum(-hf_logprobs(model, tokens).sum() for tokens in first + second)
    total.backward()  # each datum once: a double execution would double some gradients
    server = learner_gradients(stack, model_id)
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(server[name], parameter.grad, **GRAD_TOL)


def test_auth(stack):
    assert httpx.get(f"{stack.base_url}/api/v1/healthz").json() == {"status": "ok"}  # open
    for headers in ({}, {"X-API-Key": "tml-wrong"}):
        reply = httpx.post(f"{stack.base_url}/api/v1/create_session", json={}, headers=headers)
        assert reply.status_code == 401 and "X-API-Key" in reply.json()["detail"]
    with pytest.raises(tinker.AuthenticationError):
        tinker.ServiceClient(base_url=stack.base_url, api_key="tml-wrong").get_server_capabilities()


def test_a_silent_session_expires_and_frees_its_learner_session(tiny_model_dir, tmp_path):
    stack = build_stack(tmp_path, tiny_model_dir, session_timeout_s=1.0)
    try:
        with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=60) as client:
            session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
            created = client.post(
                "/api/v1/create_model",
                json={"session_id": session_id, "model_seq_id": 0, "base_model": "anvil-tiny",
                      "lora_config": {"rank": 0}},
            ).json()  # fmt: skip
            assert _result(client, created["request_id"]).json()["model_id"] == created["model_id"]
            assert len(stack.learner.sessions._sessions) == 1
            deadline = time.monotonic() + 30
            while stack.learner.sessions._sessions and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not stack.learner.sessions._sessions
            beat = client.post("/api/v1/session_heartbeat", json={"session_id": session_id})
            assert beat.status_code == 410
    finally:
        stop_stack(stack)
