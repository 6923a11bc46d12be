"""The one map between Anvil's domain errors (protos.errors) and gRPC status codes, both ways.

Servers raise domain errors and `protos.rpc` aborts with `status_for(exc)`; clients await stub calls
through `call`, which raises the domain error a status stands for, so callers catch `NotFound` or
`InvalidArgument` whichever side of the wire they are on.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from protos import errors

T = TypeVar("T")

STATUS_BY_ERROR: dict[type[errors.AnvilError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.AnvilError]] = {v: k for k, v in STATUS_BY_ERROR.items()}


STATUS_BY_PATH_ERRNO = {
    errno.ENAMETOOLONG: grpc.StatusCode.INVALID_ARGUMENT,
    errno.EISDIR: grpc.StatusCode.INVALID_ARGUMENT,
    errno.ENOENT: grpc.StatusCode.NOT_FOUND,
    errno.ENOTDIR: grpc.StatusCode.NOT_FOUND,
}
"""A path a request names that cannot be one (too long) or is not there: the caller's to fix, not INTERNAL."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status a raised exception maps to (INTERNAL for anything not an AnvilError, or a bad path)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    if isinstance(exc, OSError) and exc.errno in STATUS_BY_PATH_ERRNO:
        return STATUS_BY_PATH_ERRNO[exc.errno]
    return grpc.StatusCode.INTERNAL


def error_from_rpc(exc: grpc.aio.AioRpcError | grpc.RpcError) -> errors.AnvilError | grpc.RpcError:
    """Turn a client-side RpcError back into the domain error it came from, when there is one."""
    cls = ERROR_BY_STATUS.get(exc.code())
    return cls(exc.details()) if cls else exc


def being_cancelled() -> bool:
    """Whether the running task itself is being cancelled. grpc.aio also raises CancelledError from a call
    whose channel was closed under it (a restarted or removed server): that one is a failed call."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def call(awaitable: Awaitable[T]) -> T:
    """Await a stub call, raising the domain error a status stands for (other failures as RpcError); a call
    cut off by its channel closing is Unavailable, so it fails over like any unreachable server."""
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise error_from_rpc(exc) from exc
    except asyncio.CancelledError:
        if being_cancelled():
            raise
        closed = "the call's channel was closed while it ran (its server restarted or was removed)"
        raise errors.Unavailable(closed) from None
