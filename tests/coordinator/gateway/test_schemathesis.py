"""schemathesis against the gateway's own OpenAPI schema (coordinator/gateway/openapi.py declares every
route's JSON body): bodies, path and query parameters generated from the schema - valid and not -
sent to the package's real gateway. No request may get a 5xx; the gateway keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.coordinator.gateway.conftest import TINKER_KEY, Stack

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (pip install -e .[dev])")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

HEADERS = {"X-API-Key": TINKER_KEY}


def _operations(stack: Stack) -> list:
    schema = schemathesis.openapi.from_url(f"{stack.base_url}/openapi.json", headers=HEADERS)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Tinker's API only: the fleet and service-mode routes would add replicas and start deployments on the
    # package's shared stack (their bodies are checked by their own tests).
    return [operation for operation in operations if operation.path.startswith("/api/v1/")]


def test_the_schema_declares_the_bodies(stack: Stack):
    document = httpx.get(f"{stack.base_url}/openapi.json").json()
    body = document["paths"]["/api/v1/optim_step"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {part["$ref"].rsplit("/", 1)[1] for part in body["allOf"]} == {"Sequenced", "OptimStep"}
    assert "seq_id" in document["components"]["schemas"]["Sequenced"]["properties"]


def test_no_request_is_a_server_error(stack: Stack):
    """Every Tinker operation in the schema, 25 generated cases each (about 700 requests; schemathesis'
    pytest plugin does not run on this pytest, so its strategies drive hypothesis directly)."""
    operations = _operations(stack)
    assert len(operations) >= 25
    for operation in operations:

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def check(case) -> None:
            if case.path == "/api/v1/retrieve_future":  # an unknown id answers at once; a known one long-polls
                case.body = {**(case.body if isinstance(case.body, dict) else {}), "request_id": "req-none"}
            case.call_and_validate(base_url=stack.base_url, headers=HEADERS, checks=[not_a_server_error], timeout=60)

        check()
    assert httpx.get(f"{stack.base_url}/api/v1/healthz").json() == {"status": "ok"}
