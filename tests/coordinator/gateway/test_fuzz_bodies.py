"""Fuzzing the REST gateway (hypothesis): every POST route of `/api/v1` gets bodies that are random bytes,
random JSON, or objects with the route's own field names holding random JSON values (ids real or not).
The gateway never answers 5xx, every 4xx is `{"detail": <message>}`, and afterwards it serves as before."""

from __future__ import annotations

import string
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.coordinator.gateway.conftest import TINKER_KEY, Stack

FIELDS = {
    "create_session": ["tags", "user_metadata", "sdk_version"],
    "session_heartbeat": ["session_id"],
    "create_model": ["session_id", "model_seq_id", "base_model", "lora_config", "user_metadata"],
    "get_info": ["model_id"],
    "forward_backward": ["model_id", "seq_id", "forward_backward_input"],
    "forward": ["model_id", "seq_id", "forward_input"],
    "optim_step": ["model_id", "seq_id", "adam_params"],
    "save_weights": ["model_id", "seq_id", "path"],
    "save_weights_for_sampler": ["model_id", "seq_id", "path", "sampling_session_seq_id"],
    "load_weights": ["model_id", "seq_id", "path", "optimizer"],
    "unload_model": ["model_id"],
    "create_sampling_session": ["session_id", "sampling_session_seq_id", "base_model", "model_path"],
    "asample": ["sampling_session_id", "seq_id", "num_samples", "prompt", "sampling_params"],
    "retrieve_future": ["request_id"],
    "weights_info": ["tinker_path"],
}
ALLOWED = {200, 400, 401, 404, 409, 410, 413, 422}

finite = st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | finite | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(string.ascii_letters, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def fuzz_ids(stack: Stack):
    """A model and sampler only the fuzzer uses (random seq_ids leave gaps in its queue)."""
    with httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=120) as http:
        session = http.post("/api/v1/create_session", json={}).json()["session_id"]
        created = http.post("/api/v1/create_model", json={"session_id": session, "model_seq_id": 0}).json()
        while (
            http.post("/api/v1/retrieve_future", json={"request_id": created["request_id"]}).json().get("type")
            == "try_again"
        ):
            pass
        sampler = http.post(
            "/api/v1/create_sampling_session", json={"session_id": session, "sampling_session_seq_id": 0}
        ).json()["sampling_session_id"]
        yield {"model_id": created["model_id"], "sampling_session_id": sampler}
        http.post(f"/api/v1/sessions/{session}/finish")


def body_for(route: str, ids: dict[str, str]):
    real = {name: st.one_of(st.just(value), json_values) for name, value in ids.items()}
    fields = {name: real.get(name, json_values) for name in FIELDS[route]}
    objects = st.fixed_dictionaries({}, optional=fields)
    # JSON that Python's parser accepts but JSON does not (the gateway must refuse the values, not crash)
    literals = st.sampled_from([b"NaN", b'{"seq_id": Infinity}', f'{{"{FIELDS[route][0]}": NaN}}'.encode()])
    return st.one_of(st.binary(max_size=64), literals, json_values, objects)


@pytest.mark.parametrize("route", sorted(FIELDS))
def test_no_body_makes_the_gateway_fail(stack, fuzz_ids, route):
    http = httpx.Client(base_url=stack.base_url, headers={"X-API-Key": TINKER_KEY}, timeout=60)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body_for(route, fuzz_ids))
    def check(body: Any) -> None:
        if isinstance(body, bytes):
            reply = http.post(f"/api/v1/{route}", content=body, headers={"content-type": "application/json"})
        else:
            reply = http.post(f"/api/v1/{route}", json=body)
        assert reply.status_code in ALLOWED, (route, body, reply.status_code, reply.text)
        if reply.status_code >= 400:
            detail = reply.json()["detail"]
            assert isinstance(detail, str) and detail, (route, body, reply.text)

    try:
        check()
        info = http.post("/api/v1/get_info", json={"model_id": fuzz_ids["model_id"]})
        assert info.status_code in (200, 404), info.text  # 404 only if a fuzzed unload_model unloaded it
        assert http.get("/api/v1/healthz").json() == {"status": "ok"}
    finally:
        http.close()
