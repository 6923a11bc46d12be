"""The gateway's OpenAPI schema with the request bodies its routes read.

The routes take raw `Request`s (a forward_backward body may be protobuf or zstd, and a bad field must be
the caller's error with the gateway's own message, not FastAPI's 422), so FastAPI cannot see their bodies
and its schema would declare none. This adds each JSON body, built from the same pydantic models that
`bodies.parse` checks with, so clients and schema-driven fuzzers (schemathesis, in
tests/coordinator/gateway/test_schemathesis.py) know what to send.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from coordinator.gateway import bodies

_SEQUENCED_SAVE = (bodies.Sequenced, bodies.SaveWeights)
REQUEST_BODIES: dict[str, tuple[type[BaseModel], ...]] = {
    "/api/v1/create_session": (bodies.NewSession,),
    "/api/v1/session_heartbeat": (bodies.SessionRef,),
    "/api/v1/create_model": (bodies.NewModel, bodies.ModelSettings),
    "/api/v1/get_info": (bodies.ModelRef,),
    "/api/v1/forward_backward": (bodies.ForwardEnvelope,),
    "/api/v1/forward": (bodies.ForwardEnvelope,),
    "/api/v1/optim_step": (bodies.Sequenced, bodies.OptimStep),
    "/api/v1/save_weights": _SEQUENCED_SAVE,
    "/api/v1/save_weights_for_sampler": _SEQUENCED_SAVE,
    "/api/v1/load_weights": _SEQUENCED_SAVE,
    "/api/v1/unload_model": (bodies.ModelRef,),
    "/api/v1/create_sampling_session": (bodies.NewSampler,),
    "/api/v1/asample": (bodies.Sample,),
    "/api/v1/retrieve_future": (bodies.FutureRef,),
    "/api/v1/weights_info": (bodies.CheckpointRef,),
    "/api/v1/save_weights_external": (bodies.Sequenced, bodies.SaveWeightsExternal),
    "/api/v1/copy_weights": (bodies.CopyWeights,),
    "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}/ttl": (bodies.CheckpointTtl,),
}
"""Route -> the body models whose fields it reads (all of them, when several)."""


def with_request_bodies(app: FastAPI) -> None:
    """Make `app.openapi()` declare the JSON request body of every route in REQUEST_BODIES."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for path, models in REQUEST_BODIES.items():
                methods = schema["paths"].get(path, {})
                operation = methods.get("post") or methods.get("put")
                if operation is None:
                    continue
                refs = [_component(model, components) for model in models]
                body_schema = refs[0] if len(refs) == 1 else {"allOf": refs}
                content = {"application/json": {"schema": body_schema}}
                operation["requestBody"] = {"required": True, "content": content}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _component(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    """Add `model` (and the models it nests) to the components; return a reference to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in schema.pop("$defs", {}).items():
        components.setdefault(name, nested)
    components.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}
