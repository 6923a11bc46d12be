"""Fireworks' control-plane, hot-load and inference routes on the `anvil serve` port, and the trainer
gateway prefix that leads to each job's Tinker API.

Control-plane JSON is camelCase and errors are `{"error": {"code", "message"}}` (the SDK displays the
message); a create that already exists is a 409, which the SDK answers by fetching the resource.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.datastructures import Headers
from fastapi.responses import JSONResponse, Response, StreamingResponse

from coordinator.gateway import tenancy
from coordinator.gateway.app import body_json
from coordinator.gateway.tenancy import UNAUTHENTICATED, tenant_of_request
from coordinator.service_mode.completions import complete, sse_events
from coordinator.service_mode.control import ACCOUNT, ServiceMode
from protos.errors import AnvilError, FailedPrecondition, InvalidArgument, NotFound

TRAINER_PREFIX = "/training/v1/rlorTrainerJobs/"
_CODES = {InvalidArgument: 400, NotFound: 404, FailedPrecondition: 409}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message}}, status)


def fireworks_errors(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Response]]:
    """Route decorator: a domain error becomes Fireworks' error body; a dict becomes JSON."""

    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            result = await handler(*args, **kwargs)
        except AnvilError as exc:
            return error(_CODES.get(type(exc), 500), str(exc))
        return result if isinstance(result, Response) else JSONResponse(result)

    return wrapped


def _check_account(account: str) -> None:
    if account != ACCOUNT:
        raise NotFound(f"account {account!r} not found; this server's account is {ACCOUNT!r}")


def _deployment_of(request: Request, body: dict[str, Any] | None = None) -> str:
    name = request.headers.get("fireworks-deployment") or (body or {}).get("model") or ""
    if "/deployments/" not in name:
        raise InvalidArgument("name the deployment: header fireworks-deployment: accounts/<a>/deployments/<id>")
    return name.rsplit("/", 1)[-1]


def control_router(control: ServiceMode) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/accounts")
    async def accounts() -> dict[str, Any]:
        return {"accounts": [{"name": f"accounts/{ACCOUNT}", "displayName": "Anvil"}], "totalSize": 1}

    @router.post("/v1/accounts/{account}/deployments")
    @fireworks_errors
    async def create_deployment(account: str, request: Request, deploymentId: str = ""):
        _check_account(account)
        control.create_deployment(deploymentId, await body_json(request))
        await control.settle()
        return control.get_deployment(deploymentId)

    @router.get("/v1/accounts/{account}/deployments/{deployment_id}")
    @fireworks_errors
    async def get_deployment(account: str, deployment_id: str):
        _check_account(account)
        return control.get_deployment(deployment_id)

    @router.delete("/v1/accounts/{account}/deployments/{deployment_id}")
    @fireworks_errors
    async def delete_deployment(account: str, deployment_id: str):
        _check_account(account)
        await control.delete_deployment(deployment_id)
        return {}

    @router.post("/v1/accounts/{account}/rlorTrainerJobs")
    @fireworks_errors
    async def create_job(
        account: str,
        request: Request,
        rlorTrainerJobId: str = "",
        deploymentId: str | None = None,
    ):
        _check_account(account)
        control.create_job(rlorTrainerJobId, await body_json(request), deploymentId)
        await control.settle()
        return control.get_job(rlorTrainerJobId)

    @router.get("/v1/accounts/{account}/rlorTrainerJobs/{job_ref}")
    @fireworks_errors
    async def get_job(account: str, job_ref: str):
        _check_account(account)
        return control.get_job(job_ref)

    @router.post("/v1/accounts/{account}/rlorTrainerJobs/{job_ref}")
    @fireworks_errors
    async def job_action(account: str, job_ref: str):
        _check_account(account)
        job_id, _, action = job_ref.partition(":")
        if action != "resume":
            raise NotFound(f"no action {action!r} on trainer jobs (only :resume)")
        return await control.resume_job(job_id)

    @router.delete("/v1/accounts/{account}/rlorTrainerJobs/{job_id}")
    @fireworks_errors
    async def delete_job(account: str, job_id: str):
        _check_account(account)
        await control.delete_job(job_id)
        return {}

    @router.post("/hot_load/v1/models/hot_load")
    @fireworks_errors
    async def hot_load(request: Request):
        body = await body_json(request)
        identity = body.get("identity")
        if not identity:
            raise InvalidArgument("the body needs the snapshot 'identity' to load")
        await control.hot_load(_deployment_of(request), str(identity), body.get("incremental_snapshot_metadata"))
        return {}

    @router.get("/hot_load/v1/models/hot_load")
    @fireworks_errors
    async def hot_load_status(request: Request):
        return control.ready_deployment(_deployment_of(request)).status()

    @fireworks_errors
    async def completions(request: Request):
        body = await body_json(request)
        runtime = control.ready_deployment(_deployment_of(request, body))
        result = await complete(runtime, body)
        if body.get("stream"):
            return StreamingResponse(sse_events(result), media_type="text/event-stream")
        return result

    router.add_api_route("/inference/v1/completions", completions, methods=["POST"])
    router.add_api_route("/v1/completions", completions, methods=["POST"])
    return router


class TrainerGateway:
    """ASGI wrapper: `/training/v1/rlorTrainerJobs/{account}/{job}/<path>` goes to that job's Tinker app
    with `<path>` as its path (what Fireworks' gateway does); everything else to the main app."""

    def __init__(self, app, control: ServiceMode) -> None:
        self.app = app
        self.control = control
        self.api_keys = control.gateway.resolved_api_keys()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(TRAINER_PREFIX):
            await self.app(scope, receive, send)
            return
        parts = scope["path"][len(TRAINER_PREFIX) :].split("/", 2)
        tenant = tenant_of_request(Headers(scope=scope), self.api_keys)
        if tenant is None:
            await error(401, UNAUTHENTICATED)(scope, receive, send)
            return
        tenancy.enter(tenant)  # another tenant's job is "not found", like one never made
        doc = self.control.store.get_own("trainer_jobs", parts[1]) if len(parts) > 1 else None
        job = self.control.jobs.get(parts[1]) if len(parts) == 3 and doc is not None else None
        if job is None:
            state = (doc or {}).get("state")
            message = f"trainer job {parts[1] if len(parts) > 1 else ''!r} is {state or 'not found'}"
            await error(404 if state is None else 503, message)(scope, receive, send)
            return
        path = "/" + parts[2]
        await job.app(dict(scope, path=path, raw_path=path.encode(), root_path=""), receive, send)
