"""The fleet's REST API on `anvil serve`: list, add and remove rollout replicas while it serves.

    GET    /anvil/v1/replicas          every replica: state, address, version, requests in flight, tokens/s
    POST   /anvil/v1/replicas          {"address": "host:port", "name": optional} -> the new replica (stale
                                       until it serves the current weights, then healthy)
    DELETE /anvil/v1/replicas/{name}   takes it out of routing at once (its requests in flight move); a
                                       replica this server started is stopped too

The same API keys as the rest of the server apply. `anvil replicas list|add|remove` is the CLI for it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from coordinator.fleet.config import REPLICAS_PATH
from coordinator.fleet.health import Replica
from coordinator.fleet.replica_set import ReplicaSet

PREFIX = REPLICAS_PATH


class AddReplica(BaseModel):
    model_config = ConfigDict(extra="forbid")

    address: str = Field(pattern=r"^[^\s:]+:\d+$", description="host:port of a running rollout service")
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,64}$")


def describe(replica: Replica) -> dict[str, Any]:
    return {
        "name": replica.name,
        "address": replica.address,
        "state": replica.state.value,
        "version": replica.version,
        "in_flight": replica.in_flight,
        "tokens_per_s": replica.tokens_per_s,
        "restarts": replica.restarts,
    }


def fleet_router(replicas: ReplicaSet) -> APIRouter:
    router = APIRouter()

    @router.get(PREFIX)
    async def list_replicas() -> dict[str, Any]:
        return {"replicas": [describe(r) for r in replicas.health.replicas.values()]}

    @router.post(PREFIX)
    async def add_replica(body: AddReplica) -> dict[str, Any]:
        known = replicas.health.replicas
        if body.name in known:
            raise HTTPException(400, f"a replica named {body.name!r} exists; pick another name or remove it first")
        if any(r.address == body.address for r in known.values()):
            raise HTTPException(400, f"{body.address} is already in the fleet")
        name = body.name or next(f"replica-{i}" for i in range(len(known) + 1) if f"replica-{i}" not in known)
        replica = replicas.add(name, body.address)
        await replicas.probe()
        return describe(replica)

    @router.delete(PREFIX + "/{name}")
    async def remove_replica(name: str) -> dict[str, Any]:
        if name not in replicas.health.replicas:
            raise HTTPException(404, f"no replica named {name!r}; list them with GET {PREFIX}")
        replica = replicas.health.replicas[name]
        await replicas.remove(name)
        return describe(replica)

    return router
