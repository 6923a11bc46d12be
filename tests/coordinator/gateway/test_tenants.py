"""Tenants: each API key sees only what it made. Alice (the official SDK) trains, saves a state and sampler
weights and samples; Bob (another key on the same gateway) tries every `/api/v1` route on Alice's ids and
paths: each is NOT_FOUND (404, or a future failing with category `user`) or leaves her things out of a
listing, and Alice's training client, checkpoints and sampler are unchanged and keep working afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import tinker
from tinker import types

from tests.coordinator.gateway.conftest import OTHER_TENANT_KEY, TINKER_KEY, Stack

PROMPT = [4, 40, 405, 226, 28]


def datum() -> types.Datum:
    return types.Datum(
        model_input=types.ModelInput.from_ints(PROMPT[:-1]),
        loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * (len(PROMPT) - 1)},
    )


def outcome(client: httpx.Client, request_id: str) -> dict[str, Any]:
    while (answer := client.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()).get(
        "type"
    ) == "try_again":
        pass
    return answer


@pytest.fixture(scope="module")
def alice(stack: Stack):
    """Alice's things: a session with a trained model, a state, sampler weights and a sampling client."""
    service = tinker.ServiceClient(base_url=stack.base_url, api_key=TINKER_KEY)
    training = service.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    training.forward_backward([datum()], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
    state = training.save_state("alice-state").result().path
    weights = training.save_weights_for_sampler("alice-sampler").result().path
    sampler = service.create_sampling_client(model_path=weights)
    model_id = training.get_info().model_id
    session_id = service.holder.get_session_id()
    with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=60) as http:
        created = http.post(
            "/api/v1/create_sampling_session",
            json={"session_id": session_id, "sampling_session_seq_id": 900, "model_path": weights},
        ).json()
        second = {"session_id": session_id, "model_seq_id": 900, "base_model": "anvil-tiny"}
        request_id = http.post("/api/v1/create_model", json=second).json()["request_id"]
        assert outcome(http, request_id)["type"] == "create_model"
    before = training.forward([datum()], "cross_entropy").result().loss_fn_outputs
    yield {
        "service": service, "training": training, "sampler": sampler, "model_id": model_id,
        "session_id": session_id, "state": state, "weights": weights, "request_id": request_id,
        "sampler_id": created["sampling_session_id"], "forward": before,
    }  # fmt: skip
    service.close("success").result()


def forward_input() -> dict[str, Any]:
    return {
        "data": [{
            "model_input": {"chunks": [{"type": "encoded_text", "tokens": PROMPT[:-1]}]},
            "loss_fn_inputs": {"target_tokens": {"data": PROMPT[1:], "dtype": "int64", "shape": [4]},
                               "weights": {"data": [0.0] * 4, "dtype": "float32", "shape": [4]}},
        }],
        "loss_fn": "cross_entropy",
    }  # fmt: skip


@pytest.fixture(scope="module")
def bob(stack: Stack):
    with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": OTHER_TENANT_KEY}, timeout=60) as http:
        session_id = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0"}).json()
        yield http, session_id["session_id"]


def test_another_tenant_finds_nothing_of_alices_on_any_route(stack, alice, bob):
    http, bob_session = bob
    model_id, session_id, state, weights = alice["model_id"], alice["session_id"], alice["state"], alice["weights"]
    run_id = model_id
    not_found = {
        "get session": http.get(f"/api/v1/sessions/{session_id}"),
        "create_model in her session": http.post(
            "/api/v1/create_model", json={"session_id": session_id, "model_seq_id": 7, "base_model": "anvil-tiny"}
        ),
        "get_info": http.post("/api/v1/get_info", json={"model_id": model_id}),
        "forward": http.post(
            "/api/v1/forward", json={"model_id": model_id, "seq_id": 4, "forward_input": forward_input()}
        ),
        "forward_backward": http.post(
            "/api/v1/forward_backward",
            json={"model_id": model_id, "seq_id": 4, "forward_backward_input": forward_input()},
        ),
        "optim_step": http.post("/api/v1/optim_step", json={"model_id": model_id, "seq_id": 4, "adam_params": {}}),
        "save_weights": http.post("/api/v1/save_weights", json={"model_id": model_id, "seq_id": 4, "path": "x"}),
        "save_weights_for_sampler": http.post(
            "/api/v1/save_weights_for_sampler", json={"model_id": model_id, "seq_id": 4, "path": "x"}
        ),
        "load_weights into her model": http.post(
            "/api/v1/load_weights", json={"model_id": model_id, "seq_id": 4, "path": state}
        ),
        "sampling session from her weights": http.post(
            "/api/v1/create_sampling_session",
            json={"session_id": bob_session, "sampling_session_seq_id": 1, "model_path": weights},
        ),
        "sampling session in her session": http.post(
            "/api/v1/create_sampling_session",
            json={"session_id": session_id, "sampling_session_seq_id": 1, "base_model": "anvil-tiny"},
        ),
        "get sampler": http.get(f"/api/v1/samplers/{alice['sampler_id']}"),
        "asample": http.post(
            "/api/v1/asample",
            json={
                "sampling_session_id": alice["sampler_id"],
                "seq_id": 1,
                "num_samples": 1,
                "prompt": {"chunks": [{"type": "encoded_text", "tokens": PROMPT}]},
                "sampling_params": {"max_tokens": 2},
            },
        ),
        "retrieve_future": http.post("/api/v1/retrieve_future", json={"request_id": alice["request_id"]}),
        "training run": http.get(f"/api/v1/training_runs/{run_id}"),
        "delete checkpoint": http.delete(f"/api/v1/training_runs/{run_id}/checkpoints/weights/alice-state"),
        "weights_info": http.post("/api/v1/weights_info", json={"tinker_path": state}),
    }
    for route, answer in not_found.items():
        assert answer.status_code == 404, (route, answer.status_code, answer.text)
        assert "tenant" not in answer.text and TINKER_KEY not in answer.text, (route, answer.text)
    assert http.post("/api/v1/session_heartbeat", json={"session_id": session_id}).status_code == 410

    # futures: her state cannot seed his training client, and he cannot unload her model
    load = http.post(
        "/api/v1/load_weights", json={"session_id": bob_session, "model_seq_id": 1, "path": state, "optimizer": True}
    ).json()
    failed = outcome(http, load["request_id"])
    assert failed["category"] == "user" and "no checkpoint" in failed["error"], failed
    unload = outcome(http, http.post("/api/v1/unload_model", json={"model_id": model_id}).json()["request_id"])
    assert unload["category"] == "user" and "no training model" in unload["error"], unload
    assert http.post(f"/api/v1/sessions/{session_id}/finish").status_code == 200  # a no-op on hers

    # listings leave her things out
    assert session_id not in http.get("/api/v1/sessions").json()["sessions"]
    runs = http.get("/api/v1/training_runs", params={"limit": 1000}).json()
    assert run_id not in [r["training_run_id"] for r in runs["training_runs"]]
    assert runs["cursor"]["total_count"] == len(runs["training_runs"])
    assert http.get(f"/api/v1/training_runs/{run_id}/checkpoints").json()["checkpoints"] == []
    paths = [c["tinker_path"] for c in http.get("/api/v1/checkpoints", params={"limit": 1000}).json()["checkpoints"]]
    assert state not in paths and weights not in paths
    assert "alice-state" not in http.get("/api/v1/list_checkpoints").json()["checkpoints"]

    # ... while Alice sees and uses all of it, unchanged
    rest = alice["service"].create_rest_client()
    assert {state, weights} <= {c.tinker_path for c in rest.list_checkpoints(run_id).result().checkpoints}
    assert rest.get_training_run(run_id).result().last_checkpoint.tinker_path == state
    again = alice["training"].forward([datum()], "cross_entropy").result().loss_fn_outputs
    assert [o["logprobs"].tolist() for o in again] == [o["logprobs"].tolist() for o in alice["forward"]]
    assert alice["sampler"].sample(types.ModelInput.from_ints(PROMPT), 1, types.SamplingParams(max_tokens=2)).result()


def test_the_sdk_with_another_key_cannot_load_alices_state(stack, alice):
    """The issue's finding: create_training_client_from_state of Alice's path succeeded with Bob's key."""
    bob = tinker.ServiceClient(base_url=stack.base_url, api_key=OTHER_TENANT_KEY)
    try:
        with pytest.raises(tinker.RequestFailedError, match="no checkpoint"):
            bob.create_training_client_from_state(alice["state"]).result()
        runs = bob.create_rest_client().list_training_runs(limit=100).result().training_runs
        assert alice["model_id"] not in [r.training_run_id for r in runs]
    finally:
        bob.close("success").result()


def test_an_unknown_key_is_unauthenticated(stack):
    answer = httpx.get(f"{stack.base_url}/api/v1/sessions", headers={"X-API-Key": "tml-nobody"})
    assert answer.status_code == 401 and "X-API-Key" in answer.json()["detail"]


def test_keys_come_from_the_config_the_environment_and_a_file(tmp_path, monkeypatch):
    from coordinator.gateway.config import API_KEYS_ENV, GatewayConfig

    keys = tmp_path / "keys"
    keys.write_text("# one per line\ntml-from-file\n\n  tml-indented  \n")
    monkeypatch.setenv(API_KEYS_ENV, "tml-env-a, tml-env-b")
    config = GatewayConfig(api_keys=["tml-config"], api_keys_file=keys)
    assert config.resolved_api_keys() == ["tml-config", "tml-env-a", "tml-env-b", "tml-from-file", "tml-indented"]
    with pytest.raises(ValueError, match=r"api_keys_file .* cannot be read"):
        GatewayConfig(api_keys_file=tmp_path / "missing").resolved_api_keys()
