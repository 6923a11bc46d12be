"""Tenants: every API key the gateway accepts is a tenant, and a tenant sees only what it made.

Sessions, training runs (and so their checkpoints), sampling clients and futures record the tenant that
created them; every lookup by id answers NOT_FOUND (404, the same message as for an id that never
existed) when the caller is another tenant, and every listing shows the caller's own only. A gateway
without keys has one tenant, "".

The tenant of a request is set by the app's authentication (a context variable, so it reaches the work a
request queues: asyncio tasks copy the context they are created in). It is a digest of the key, never the
key itself: records on disk and logs carry `tenant-<16 hex>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator, Mapping
from contextvars import ContextVar

_TENANT: ContextVar[str] = ContextVar("anvil_tenant", default="")
UNAUTHENTICATED = "missing or unknown X-API-Key; set TINKER_API_KEY to a key this server accepts"


def tenant_of_key(key: str) -> str:
    """The tenant name of an API key: a digest, so that nothing stored or logged reveals the key."""
    return "tenant-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def tenant_of_request(headers: Mapping[str, str], api_keys: list[str]) -> str | None:
    """The tenant whose key the request carries (`X-API-Key` or `Authorization: Bearer`); "" when the
    gateway has no keys; None when it has keys and the request carries none of them."""
    if not api_keys:
        return ""
    given = [headers.get("x-api-key") or "", headers.get("authorization", "").removeprefix("Bearer ").strip()]
    for key in api_keys:
        if any(candidate and secrets.compare_digest(candidate.encode(), key.encode()) for candidate in given):
            return tenant_of_key(key)
    return None


def enter(tenant: str) -> None:
    """Make `tenant` the caller for the rest of this request (and the tasks it starts)."""
    _TENANT.set(tenant)


def current() -> str:
    return _TENANT.get()


def owns(owner: str) -> bool:
    """Whether the current caller is `owner` (the tenant recorded when the thing was made)."""
    return owner == _TENANT.get()


@contextlib.contextmanager
def acting_as(tenant: str) -> Iterator[None]:
    """Be `tenant` inside the block (what operators' tools and tests use to look at a tenant's things)."""
    token = _TENANT.set(tenant)
    try:
        yield
    finally:
        _TENANT.reset(token)
