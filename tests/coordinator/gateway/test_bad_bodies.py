"""Malformed REST bodies on every `/api/v1` route: each is a 4xx `{"detail"}` or a future failing with
category `user`, the message names the bad field, no message shows a server directory, and the gateway
keeps serving (the same training client trains afterwards)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.coordinator.gateway.conftest import TINKER_KEY, Stack

USER = "user"
"""Expected outcome: the route answers a request id whose future fails with category `user`."""


@dataclass
class Ids:
    client: httpx.Client
    session_id: str
    model_id: str
    sampler_id: str
    seq: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    """The training client's next seq_id; taken only by requests the gateway queues."""
    counter: Iterator[int] = field(default_factory=lambda: itertools.count(100))
    """Fresh model_seq_id / sampling seq_id values."""

    def next(self) -> int:
        return next(self.seq)

    def fresh(self) -> int:
        return next(self.counter)


def result(client: httpx.Client, request_id: str) -> dict[str, Any]:
    while True:
        answer = client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if answer.get("type") != "try_again":
            return answer


def tensor(data: Any, dtype: str = "int64") -> dict[str, Any]:
    return {"data": data, "dtype": dtype, "shape": [len(data)] if isinstance(data, list) else None}


def datum(model_input: Any = None, **inputs: Any) -> dict[str, Any]:
    chunks = {"chunks": [{"type": "encoded_text", "tokens": [5, 6, 7]}]}
    loss_fn_inputs = {"target_tokens": tensor([6, 7, 8]), "weights": tensor([1.0, 1.0, 1.0], "float32"), **inputs}
    return {"model_input": chunks if model_input is None else model_input, "loss_fn_inputs": loss_fn_inputs}


def fwdbwd(ids: Ids, seq_id: Any = None, data: Any = None, loss_fn: Any = "cross_entropy", **extra: Any) -> dict:
    inner = {"data": [datum()] if data is None else data, "loss_fn": loss_fn, **extra}
    seq = ids.next() if seq_id is None else seq_id
    return {"model_id": ids.model_id, "seq_id": seq, "forward_backward_input": inner}


def sequenced(ids: Ids, **body: Any) -> dict[str, Any]:
    return {"model_id": ids.model_id, "seq_id": ids.next(), **body}


def sample(ids: Ids, **body: Any) -> dict[str, Any]:
    base = {"sampling_session_id": ids.sampler_id, "seq_id": ids.fresh(), "num_samples": 1}
    return {**base, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [4, 5]}]}, **body}


Body = Callable[[Ids], Any]
# fmt: off
CASES: list[tuple[str, str, Body, int | str, str]] = [
    # route, id, body (bytes are sent as they are), expected status or USER, text the message must contain
    ("forward_backward", "not-json", lambda i: b"{not json", 400, "not JSON"),
    ("forward_backward", "not-utf8", lambda i: b"\xff\xfe\x00", 400, "not JSON"),
    ("forward_backward", "a-list", lambda i: b"[1, 2]", 400, "the body must be a JSON object"),
    ("forward_backward", "seq-id", lambda i: fwdbwd(i, seq_id="abc"), 400, "seq_id must be an integer, got 'abc'"),
    ("forward_backward", "model-id-type", lambda i: {**fwdbwd(i, seq_id=1), "model_id": 5}, 400, "model_id"),
    ("forward_backward", "unknown-model", lambda i: {**fwdbwd(i, seq_id=1), "model_id": "sess-0:train:9"}, 404,
     "no training model"),
    ("forward_backward", "input-type", lambda i: {"model_id": i.model_id, "seq_id": 1, "forward_backward_input": 3},
     400, "forward_backward_input must be an object"),
    ("forward_backward", "model-input", lambda i: fwdbwd(i, data=[datum("bad")]), USER, "data[0].model_input"),
    ("forward_backward", "tokens", lambda i: fwdbwd(i, data=[datum({"chunks": [{"tokens": ["x"]}]})]), USER,
     "tokens[0] must be an integer"),
    ("forward_backward", "data-type", lambda i: fwdbwd(i, data="all"), USER, "data must be a list"),
    ("forward_backward", "loss-fn", lambda i: fwdbwd(i, loss_fn=7), USER, "loss_fn must be a string"),
    ("forward_backward", "loss-fn-config", lambda i: fwdbwd(i, loss_fn_config={"clip": "x"}), USER, "loss_fn_config"),
    ("forward_backward", "loss-fn-inputs", lambda i: fwdbwd(i, data=[datum(weights=tensor(["a"] * 3, "float32"))]),
     USER, "loss_fn_inputs['weights']"),
    ("forward", "seq-id", lambda i: {"model_id": i.model_id, "seq_id": [1], "forward_input": {}}, 400, "seq_id"),
    ("optim_step", "seq-id", lambda i: {"model_id": i.model_id, "seq_id": "abc"}, 400,
     "seq_id must be an integer, got 'abc'"),
    ("optim_step", "adam-type", lambda i: sequenced(i, adam_params="fast"), USER, "adam_params must be an object"),
    ("optim_step", "learning-rate", lambda i: sequenced(i, adam_params={"learning_rate": "fast"}), USER,
     "learning_rate"),
    ("optim_step", "beta1-range", lambda i: sequenced(i, adam_params={"beta1": 2}), USER, "beta1"),
    ("optim_step", "normalization", lambda i: sequenced(i, grad_accumulation_normalization=5), USER,
     "grad_accumulation_normalization"),
    ("save_weights", "path", lambda i: sequenced(i, path=5), USER, "path must be a string"),
    ("save_weights_for_sampler", "sampler-seq", lambda i: sequenced(i, sampling_session_seq_id="x"), USER,
     "sampling_session_seq_id"),
    ("load_weights", "path", lambda i: sequenced(i, path=["a"]), USER, "path must be a string"),
    ("load_weights", "model-seq-id", lambda i: {"session_id": i.session_id, "model_seq_id": "x", "path": "p"}, 400,
     "model_seq_id"),
    ("create_session", "metadata", lambda i: {"user_metadata": "x"}, 400, "user_metadata must be an object"),
    ("create_model", "session-id", lambda i: {"session_id": 5, "model_seq_id": 0}, 400, "session_id"),
    ("create_model", "model-seq-id", lambda i: {"session_id": i.session_id, "model_seq_id": "abc"}, 400,
     "model_seq_id must be an integer"),
    ("create_model", "lora-config", lambda i: {"session_id": i.session_id, "model_seq_id": i.fresh(),
                                               "lora_config": "x"}, USER, "lora_config must be an object"),
    ("create_model", "base-model", lambda i: {"session_id": i.session_id, "model_seq_id": i.fresh(),
                                              "base_model": 3}, USER, "base_model must be a string"),
    ("create_sampling_session", "seq", lambda i: {"session_id": i.session_id, "sampling_session_seq_id": "x"}, 400,
     "sampling_session_seq_id"),
    ("create_sampling_session", "base-model", lambda i: {"session_id": i.session_id, "sampling_session_seq_id": 9,
                                                         "base_model": 3}, 400, "base_model"),
    ("asample", "seq-id", lambda i: sample(i, seq_id="abc"), 400, "seq_id must be an integer"),
    ("asample", "num-samples", lambda i: sample(i, num_samples="two"), 400, "num_samples"),
    ("asample", "unknown-sampler", lambda i: sample(i, sampling_session_id="sess-0:sample:0"), 404,
     "no sampling session"),
    ("asample", "prompt", lambda i: sample(i, prompt="bad"), USER, "prompt must be an object"),
    ("asample", "params-type", lambda i: sample(i, sampling_params="hot"), USER, "sampling_params must be an object"),
    ("asample", "temperature", lambda i: sample(i, sampling_params={"temperature": "hot"}), USER,
     "sampling_params.temperature must be a number"),
    ("asample", "max-tokens", lambda i: sample(i, sampling_params={"max_tokens": -1}), USER, "max_tokens"),
    ("asample", "top-k-range", lambda i: sample(i, sampling_params={"top_k": 10**12}), USER,
     "sampling_params.top_k must be less than 2147483648"),
    ("asample", "stop", lambda i: sample(i, sampling_params={"stop": 5}), USER, "sampling_params.stop"),
    ("retrieve_future", "missing", lambda i: {}, 400, "request_id"),
    ("retrieve_future", "unknown", lambda i: {"request_id": "req-0"}, 404, "no request"),
    ("session_heartbeat", "session-id", lambda i: {"session_id": None}, 400, "session_id"),
    ("get_info", "model-id", lambda i: {"model_id": 3}, 400, "model_id must be a string"),
    ("unload_model", "model-id", lambda i: {"model_id": []}, 400, "model_id"),
    ("weights_info", "tinker-path", lambda i: {"tinker_path": 3}, 400, "tinker_path"),
    ("weights_info", "not-a-path", lambda i: {"tinker_path": "x"}, 400, "expected tinker://<run_id>/<kind>/<name>"),
    ("GET training_runs?limit=abc", "limit", None, 400, "limit must be an integer, got 'abc'"),
    ("GET checkpoints?offset=-1", "offset", None, 400, "offset"),
]
# fmt: on


@pytest.fixture(scope="module")
def ids(stack: Stack) -> Iterator[Ids]:
    with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=60) as client:
        session_id = client.post("/api/v1/create_session", json={}).json()["session_id"]
        created = client.post("/api/v1/create_model", json={"session_id": session_id, "model_seq_id": 0}).json()
        assert result(client, created["request_id"])["model_id"] == created["model_id"]
        sampler = client.post(
            "/api/v1/create_sampling_session", json={"session_id": session_id, "sampling_session_seq_id": 0}
        ).json()
        yield Ids(client, session_id, created["model_id"], sampler["sampling_session_id"])


def assert_no_server_path(stack: Stack, message: str) -> None:
    service = stack.gateway.service
    for directory in (service.config.state_dir.parent, service.model_dir):
        assert str(directory) not in message, message
    assert "runs/" not in message and "/tmp/" not in message, message


@pytest.mark.parametrize(("route", "case", "body", "expected", "names"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_a_malformed_body_is_a_user_error_naming_the_field(stack, ids, route, case, body, expected, names):
    if route.startswith("GET "):
        reply = ids.client.get(f"/api/v1/{route.removeprefix('GET ')}")
    else:
        given = body(ids)
        sent = {"content": given} if isinstance(given, bytes) else {"json": given}
        reply = ids.client.post(f"/api/v1/{route}", **sent)
    if expected == USER:
        assert reply.status_code == 200, reply.text
        outcome = result(ids.client, reply.json()["request_id"])
        assert outcome.get("category") == "user", outcome
        message = outcome["error"]
    else:
        assert reply.status_code == expected, reply.text
        message = reply.json()["detail"]
        assert isinstance(message, str)
    assert names in message
    assert_no_server_path(stack, message)


def test_errors_from_the_learner_show_no_server_path_and_the_client_still_trains(stack, ids):
    first = ids.client.post("/api/v1/save_weights", json=sequenced(ids, path="twice")).json()
    assert result(ids.client, first["request_id"])["path"].endswith("/weights/twice")
    again = ids.client.post("/api/v1/save_weights", json=sequenced(ids, path="twice")).json()
    outcome = result(ids.client, again["request_id"])
    assert outcome["category"] == "user" and "'twice'" in outcome["error"] and "already exists" in outcome["error"]
    assert_no_server_path(stack, outcome["error"])

    trained = ids.client.post("/api/v1/forward_backward", json=fwdbwd(ids)).json()
    assert result(ids.client, trained["request_id"])["metrics"]["loss:sum"] > 0
    stepped = ids.client.post("/api/v1/optim_step", json=sequenced(ids, adam_params={"learning_rate": 1e-4}))
    assert result(ids.client, stepped.json()["request_id"])["type"] == "optim_step"
    assert ids.client.get("/api/v1/healthz").json() == {"status": "ok"}


def test_a_body_over_max_request_bytes_is_413_naming_the_limit(stack):
    """The package gateway takes at most 4 MiB per body (max_request_bytes); the body is not read."""
    headers = {"X-API-Key": TINKER_KEY, "Content-Type": "application/json"}
    reply = httpx.post(f"{stack.base_url}/api/v1/forward_backward", content=b" " * (5 * 2**20), headers=headers)
    assert reply.status_code == 413
    assert "at most 4194304" in reply.json()["detail"] and "max_request_bytes" in reply.json()["detail"]
    assert httpx.get(f"{stack.base_url}/api/v1/healthz").status_code == 200
