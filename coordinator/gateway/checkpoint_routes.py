"""The REST routes of checkpoints: list, weights_info, delete, TTL, publish, copy, and the external weights
download links (get_external_weights_urls and the signed file URLs they point at, which carry no key)."""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.responses import FileResponse

from coordinator.gateway import bodies
from coordinator.gateway.bodies import json_object, parse
from coordinator.gateway.checkpoint_copies import CheckpointCopies
from coordinator.gateway.checkpoints import CheckpointStore, tinker_path
from coordinator.gateway.external_weights import FILES_ROUTE, ExternalWeightLinks, LinkRefused

SWEEP_INTERVAL_S = 60.0
CHECKPOINT = "/api/v1/training_runs/{run_id}/checkpoints/{kind}/{name}"


def checkpoint_router(checkpoints: CheckpointStore, copies: CheckpointCopies, links: ExternalWeightLinks) -> APIRouter:
    router = APIRouter()

    @router.get("/api/v1/training_runs/{run_id}/checkpoints")
    async def run_checkpoints(run_id: str) -> dict[str, Any]:
        return {"checkpoints": [c.to_tinker() for c in checkpoints.of_run(run_id)], "cursor": None}

    @router.get("/api/v1/checkpoints")
    async def all_checkpoints(limit: int = Query(100, ge=0), offset: int = Query(0, ge=0)) -> dict[str, Any]:
        records = checkpoints.all()
        page = [c.to_tinker() for c in records[offset : offset + limit]]
        return {"checkpoints": page, "cursor": {"offset": offset, "limit": limit, "total_count": len(records)}}

    @router.get("/api/v1/list_checkpoints")
    async def list_checkpoints() -> dict[str, Any]:
        """Fireworks' list: the names of the caller's training states."""
        return {"checkpoints": checkpoints.state_names()}

    @router.post("/api/v1/weights_info")
    async def weights_info(request: Request) -> dict[str, Any]:
        path = parse(bodies.CheckpointRef, json_object(await request.body())).tinker_path
        return checkpoints.get(path).weights_info()

    @router.delete(CHECKPOINT)
    async def delete_checkpoint(run_id: str, kind: str, name: str) -> dict[str, Any]:
        checkpoints.delete(tinker_path(run_id, kind, name))
        return {}

    @router.put(CHECKPOINT + "/ttl")
    async def set_ttl(run_id: str, kind: str, name: str, request: Request) -> dict[str, Any]:
        ttl = parse(bodies.CheckpointTtl, json_object(await request.body())).ttl_seconds
        return checkpoints.set_ttl(tinker_path(run_id, kind, name), ttl).to_tinker()

    @router.post(CHECKPOINT + "/publish")
    async def publish(run_id: str, kind: str, name: str) -> dict[str, Any]:
        return checkpoints.set_public(tinker_path(run_id, kind, name), True).to_tinker()

    @router.delete(CHECKPOINT + "/publish")
    async def unpublish(run_id: str, kind: str, name: str) -> dict[str, Any]:
        return checkpoints.set_public(tinker_path(run_id, kind, name), False).to_tinker()

    @router.post("/api/v1/copy_weights")
    async def copy_weights(
        request: Request, idempotency_key: str | None = Header(None, alias="X-Idempotency-Key")
    ) -> dict[str, Any]:
        body = parse(bodies.CopyWeights, json_object(await request.body()))
        return await asyncio.to_thread(copies.copy, body, idempotency_key)

    @router.get("/api/v1/training_runs/{run_id}/checkpoints/external_weights/{name}/external_weights_urls")
    async def external_weights_urls(run_id: str, name: str, request: Request) -> dict[str, Any]:
        record = checkpoints.get(tinker_path(run_id, "external_weights", name))
        return links.urls(record, str(request.base_url))

    @router.get(FILES_ROUTE + "/{run_id}/{name}/{relative:path}")
    async def external_weights_file(
        run_id: str, name: str, relative: str, expires: int = Query(...), signature: str = Query(...)
    ) -> FileResponse:
        try:
            file = links.file(run_id, name, relative, expires, signature)
        except LinkRefused as exc:
            raise HTTPException(403, str(exc)) from None
        return FileResponse(file, media_type="application/octet-stream")

    return router


async def sweep_expired_forever(checkpoints: CheckpointStore, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Delete the directories of checkpoints past their TTL (run as a task; they are invisible at once)."""
    while True:
        await asyncio.sleep(interval_s)
        for directory in checkpoints.take_expired():
            await asyncio.to_thread(shutil.rmtree, directory, True)
