"""The FastAPI app: Tinker's `/api/v1` routes over a TinkerService and the pieces it holds.

HTTP concerns only: auth (`X-API-Key`), body parsing, status codes, and the result encoding of
`retrieve_future` (protobuf when the poll accepts `application/x-protobuf`, JSON otherwise). A request
the gateway cannot even attribute (bad JSON, unknown session, a seq_id that is not an integer) is a 4xx
`{"detail": message}`; anything wrong with the work itself comes back through its future as
`{"error", "category": "user"}`, which the SDK raises as RequestFailedError, so a training client's seq_id
sequence never stalls on a rejected request. The bodies' fields are declared in `bodies.py`, whose
`parse` names the bad field; no message shows a server filesystem path (`futures.without_paths`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from coordinator.gateway import bodies, tenancy
from coordinator.gateway.bodies import json_object, parse
from coordinator.gateway.checkpoint_copies import CheckpointCopies
from coordinator.gateway.checkpoint_routes import checkpoint_router
from coordinator.gateway.external_weights import FILES_ROUTE, ExternalWeightLinks
from coordinator.gateway.futures import Outcome, without_paths
from coordinator.gateway.openapi import with_request_bodies
from coordinator.gateway.operations import PROTOBUF, forward_operation, sequenced_operation
from coordinator.gateway.service import TinkerService, fingerprint
from coordinator.gateway.tenancy import UNAUTHENTICATED, tenant_of_request
from coordinator.tokenizer_cache import TOKENIZER_ROUTE, encode_files, tokenizer_files
from protos.errors import AlreadyExists, AnvilError, FailedPrecondition, InvalidArgument, NotFound

OPEN_PATHS = {"/api/v1/healthz"}
OPEN_PREFIXES = (FILES_ROUTE + "/",)
"""Signed download URLs: fetched without a key (each carries its own signature; external_weights.py)."""
_STATUS = {InvalidArgument: 400, NotFound: 404, FailedPrecondition: 400, AlreadyExists: 400}


async def body_json(request: Request) -> dict[str, Any]:
    """The request's JSON object body ({} when empty); InvalidArgument otherwise."""
    return json_object(await request.body())


def create_app(service: TinkerService, api_keys: list[str]) -> FastAPI:
    async def authenticate(request: Request) -> None:
        tenant = tenant_of_request(request.headers, api_keys)
        path = request.url.path
        if tenant is None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            raise HTTPException(401, UNAUTHENTICATED)
        tenancy.enter(tenant or "")
        size = request.headers.get("content-length", "0")
        if not size.isdigit() or int(size) > service.config.max_request_bytes:
            limit = service.config.max_request_bytes
            raise HTTPException(413, f"the body is {size} bytes; this server takes at most {limit} (max_request_bytes)")

    app = FastAPI(title="Anvil Tinker gateway", docs_url=None, redoc_url=None, dependencies=[Depends(authenticate)])
    config = service.config

    @app.exception_handler(AnvilError)
    async def anvil_error(request: Request, exc: AnvilError) -> JSONResponse:
        detail = without_paths(str(exc), service.futures.private_roots)
        return JSONResponse({"detail": detail}, _STATUS.get(type(exc), 500))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A bad query or path parameter (`?limit=abc`): 400 in the same `{"detail": str}` form."""
        errors = [dict(error, loc=tuple(error["loc"][1:])) for error in exc.errors()]
        return JSONResponse({"detail": bodies.describe(errors)}, 400)

    # --- client bootstrap, health, sessions -----------------------------------------------------------

    @app.post("/api/v1/client/config")
    async def client_config() -> dict[str, Any]:
        return {
            "pjwt_auth_enabled": False,
            "use_pyqwest_transport": False,
            "fwdbwd_max_chunk_len": config.fwdbwd_max_chunk_len,
            "parallel_fwdbwd_chunks": True,
            "custom_loss_server_side": False,
            "sample_use_retrieve_futures": False,
            "sample_join_sampling_session": False,
        }

    @app.post("/api/v1/client/dynamic_config")
    async def dynamic_config() -> dict[str, Any]:
        return {"refresh_interval_sec": 300, "sample_cancel_enabled": False}

    @app.get("/api/v1/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/v1/get_server_capabilities")
    async def capabilities() -> dict[str, Any]:
        model = {"model_name": config.model, "trainable": True, "sampleable": True}
        return {"supported_models": [model, *service.sampling.sampling_only.capabilities()]}

    @app.post("/api/v1/create_session")
    async def create_session(request: Request) -> dict[str, Any]:
        given = parse(bodies.NewSession, await body_json(request))
        session = service.sessions.create(given.user_metadata or {})
        return {"type": "create_session", "session_id": session.session_id}

    @app.post("/api/v1/session_heartbeat")
    async def heartbeat(request: Request) -> Response:
        session_id = parse(bodies.SessionRef, await body_json(request)).session_id
        try:
            session = service.sessions.get(session_id)
        except NotFound as exc:
            return JSONResponse({"detail": str(exc)}, 410)
        session.last_heartbeat = time.monotonic()
        return JSONResponse({"type": "session_heartbeat"})

    @app.post("/api/v1/sessions/{session_id}/finish")
    async def finish(session_id: str) -> dict[str, Any]:
        with contextlib.suppress(NotFound):  # finishing twice, or a session not (or no longer) the caller's
            await service.sessions.finish(service.sessions.get(session_id), "finished")
        return {"status": "finished"}

    @app.get("/api/v1/sessions/{session_id}")
    async def get_session(session_id: str) -> dict[str, Any]:
        session = service.sessions.get(session_id)
        return {"training_run_ids": list(session.models), "sampler_ids": list(session.samplers)}

    @app.get("/api/v1/sessions")
    async def list_sessions() -> dict[str, Any]:
        return {"sessions": [s.session_id for s in service.sessions.open_sessions()]}

    @app.post("/api/v1/telemetry")
    async def telemetry() -> dict[str, str]:
        return {"status": "accepted"}

    # --- training ------------------------------------------------------------------------------------

    @app.post("/api/v1/create_model")
    async def create_model(request: Request) -> dict[str, Any]:
        return service.create_model(await body_json(request))

    @app.post("/api/v1/get_info")
    async def get_info(request: Request) -> dict[str, Any]:
        return service.get_info(parse(bodies.ModelRef, await body_json(request)).model_id)

    @app.post("/api/v1/forward_backward")
    async def forward_backward(request: Request) -> dict[str, Any]:
        raw = await request.body()
        headers = request.headers
        operation = forward_operation(
            raw, headers.get("content-type", ""), headers.get("content-encoding", ""), forward_route=False
        )
        return service.submit(operation, fingerprint(raw))

    @app.post("/api/v1/forward")
    async def forward(request: Request) -> dict[str, Any]:
        raw = await request.body()
        return service.submit(forward_operation(raw, "", "", forward_route=True), fingerprint(raw))

    async def sequenced(request: Request, kind: str) -> dict[str, Any]:
        raw = await request.body()
        return service.submit(sequenced_operation(kind, raw), fingerprint(raw))

    @app.post("/api/v1/optim_step")
    async def optim_step(request: Request) -> dict[str, Any]:
        return await sequenced(request, "optim_step")

    @app.post("/api/v1/save_weights")
    async def save_weights(request: Request) -> dict[str, Any]:
        return await sequenced(request, "save_weights")

    @app.post("/api/v1/save_weights_for_sampler")
    async def save_weights_for_sampler(request: Request) -> dict[str, Any]:
        return await sequenced(request, "save_weights_for_sampler")

    @app.post("/api/v1/save_weights_external")
    async def save_weights_external(request: Request) -> dict[str, Any]:
        return await sequenced(request, "save_weights_external")

    @app.post("/api/v1/load_weights")
    async def load_weights(request: Request) -> dict[str, Any]:
        body = await body_json(request)
        if body.get("model_id") is None:  # create-via-load: a new training client from a state
            return service.create_from_state(body)
        return await sequenced(request, "load_weights")

    @app.post("/api/v1/unload_model")
    async def unload_model(request: Request) -> dict[str, Any]:
        model_id = parse(bodies.ModelRef, await body_json(request)).model_id
        return {"request_id": service.futures.run("unload_model", lambda: service.unload_model(model_id))}

    # --- sampling ------------------------------------------------------------------------------------

    @app.post("/api/v1/create_sampling_session")
    async def create_sampling_session(request: Request) -> dict[str, Any]:
        return service.sampling.create_session(await body_json(request))

    @app.get("/api/v1/samplers/{sampler_id}")
    async def get_sampler(sampler_id: str) -> dict[str, Any]:
        return service.sampling.describe(sampler_id)

    @app.post("/api/v1/asample")
    async def asample(request: Request) -> dict[str, Any]:
        return service.sampling.asample(await body_json(request))

    # --- futures -------------------------------------------------------------------------------------

    @app.post("/api/v1/retrieve_future")
    async def retrieve_future(request: Request) -> Response:
        request_id = parse(bodies.FutureRef, await body_json(request)).request_id
        outcome: Outcome | None = await service.futures.wait(request_id, config.long_poll_s)
        if outcome is None:
            return JSONResponse({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        if outcome.error is not None:
            return JSONResponse({"error": outcome.error, "category": outcome.category})
        value = outcome.value
        if hasattr(value, "proto"):
            if PROTOBUF in request.headers.get("accept", ""):
                return Response(value.proto(), media_type=PROTOBUF)
            return JSONResponse(value.json())
        return JSONResponse(value)

    # --- training runs and checkpoints ---------------------------------------------------------------

    @app.get("/api/v1/training_runs/{run_id}")
    async def training_run(run_id: str) -> dict[str, Any]:
        return service.training_run(run_id)

    @app.get("/api/v1/training_runs")
    async def training_runs(limit: int = Query(20, ge=0), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        ids = service.training_runs.ids()
        page = [service.training_run(run_id) for run_id in ids[offset : offset + limit]]
        return {"training_runs": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(ids)}}

    @app.get(TOKENIZER_ROUTE)
    async def tokenizer() -> dict[str, Any]:
        """The served model's tokenizer files (no weights), for `anvil tokenizer` (coordinator/tokenizer_cache.py)."""
        return {"base_model": config.model, "files": encode_files(tokenizer_files(service.model_dir))}

    state_dir = config.state_dir
    copies = CheckpointCopies(state_dir, service.checkpoints, service.training_runs)
    links = ExternalWeightLinks(state_dir, service.checkpoints)
    app.include_router(checkpoint_router(service.checkpoints, copies, links))
    with_request_bodies(app)
    return app
