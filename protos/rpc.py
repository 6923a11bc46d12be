"""The one way Anvil starts gRPC servers: health, reflection, API-key auth, error -> status, graceful stop.

Every service (learner, rollout, coordinator) boots through `start_server`, which binds the address
(`127.0.0.1:0` picks a free port and reports it), registers grpc.health.v1 and server reflection, caps
message sizes, checks the API key, and turns the domain errors of `protos.errors` into gRPC statuses.
Health checks and reflection stay open when auth is on, so orchestrators can probe without a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field

from protos import errors
from protos.channels import DEFAULT_MAX_MESSAGE_BYTES
from protos.status import status_for
from protos.tls import server_credentials

logger = logging.getLogger(__name__)

API_KEY_ENV = "ANVIL_API_KEY"
"""Environment variable that turns auth on when a config leaves `api_key` unset."""

_OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ServerConfig(BaseModel):
    """Where and how a service listens."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    host: str = "127.0.0.1"
    """Interface to bind; 0.0.0.0 serves other machines."""
    port: int = Field(default=0, ge=0, le=65535)
    """Port to bind; 0 picks a free one and the bound port is reported."""
    api_key: str | None = None
    """Required bearer key; None falls back to $ANVIL_API_KEY, and auth is off when both are unset."""
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    """Largest request or response message, in bytes (weight chunks and batches must fit)."""
    grace_s: float = Field(default=5.0, ge=0)
    """Seconds in-flight calls get to finish when the server stops."""
    tls_cert: Path | None = None
    """PEM certificate chain: serve TLS only (None falls back to $ANVIL_TLS_CERT; see protos.tls)."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert` (None falls back to $ANVIL_TLS_KEY)."""
    tls_client_ca: Path | None = None
    """Require client certificates signed by this CA: mutual TLS (None falls back to $ANVIL_TLS_CLIENT_CA)."""

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(API_KEY_ENV) or None


# --- server side -------------------------------------------------------------------------------------


class _Undecodable:
    """What a request deserializer gives for bytes that are not its message (grpc itself would answer
    INTERNAL): the handler's wrapper turns it into INVALID_ARGUMENT naming the message type."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, and whatever else a corrupt message raises
            return _Undecodable(exc)

    return deserialize


def _decoded(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument(f"the request is not a valid protobuf message of this method: {request.error}")
    return request


async def _decoded_stream(requests: Any) -> Any:
    async for request in requests:
        yield _decoded(request)


_DRAIN_BEFORE_ABORT_S = 10.0


async def _drain(requests: Any) -> None:
    """Read the rest of a refused request stream (for at most _DRAIN_BEFORE_ABORT_S).

    A client still writing when the server aborts can lose the race in grpc-core: its next send fails and the
    call ends INTERNAL "Internal error from Core" instead of the server's status. Reading to the client's
    half-close first lets every write land, so the client sees the real status and message.
    """

    async def read_all() -> None:
        async for _ in requests:
            pass

    with contextlib.suppress(Exception):  # a cut or slow stream: abort anyway
        await asyncio.wait_for(read_all(), _DRAIN_BEFORE_ABORT_S)


def _wrap_behavior(
    behavior: Callable[..., Any], streaming_request: bool, streaming_response: bool
) -> Callable[..., Any]:
    """Wrap a handler so domain errors abort with their status and nothing else leaks as UNKNOWN or INTERNAL
    (undecodable request bytes included)."""

    async def abort_for(exc: Exception, context: grpc.aio.ServicerContext) -> None:
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            logger.exception("unhandled error in handler")
            await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
        await context.abort(code, str(exc))

    def checked(request: Any) -> Any:
        return _decoded_stream(request) if streaming_request else _decoded(request)

    if streaming_response and inspect.isasyncgenfunction(behavior):

        async def wrapped_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                async for item in behavior(checked(request), context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await abort_for(exc, context)

        return wrapped_stream

    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(checked(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if streaming_request:
                await _drain(request)
            await abort_for(exc, context)

    return wrapped


def _rebuild_handler(
    handler: grpc.RpcMethodHandler,
    make_behavior: Callable[[Callable[..., Any], bool, bool], Callable[..., Any]],
    tolerant: bool = False,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind and (de)serialisers whose behavior is make_behavior(old, streaming request,
    streaming response); `tolerant`: undecodable requests reach the behavior as `_Undecodable`."""
    decode = _tolerant(handler.request_deserializer) if tolerant else handler.request_deserializer
    codecs = {"request_deserializer": decode, "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(make_behavior(handler.unary_unary, False, False), **codecs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(make_behavior(handler.unary_stream, False, True), **codecs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(make_behavior(handler.stream_unary, True, False), **codecs)
    return grpc.stream_stream_rpc_method_handler(make_behavior(handler.stream_stream, True, True), **codecs)


class _ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        return None if handler is None else _rebuild_handler(handler, _wrap_behavior, tolerant=True)


class _ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Answer UNAUTHENTICATED unless metadata carries `authorization: Bearer <key>`."""

    def __init__(self, api_key: str) -> None:
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_OPEN_METHOD_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return handler

        def reject(_: Callable[..., Any], __: bool, ___: bool) -> Callable[..., Any]:
            async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
                why = "missing" if not given else "wrong"
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"API key {why}: send metadata 'authorization: Bearer <key>' with the server's key",
                )

            return deny

        return _rebuild_handler(handler, reject)


@dataclass(frozen=True)
class ServiceSpec:
    """One servicer to register: the generated `add_XServicer_to_server` and the full service name."""

    add_to_server: Callable[[Any, grpc.aio.Server], None]
    servicer: Any
    full_name: str


@dataclass
class RunningServer:
    """A started server: its bound port, and a graceful stop that first reports NOT_SERVING."""

    server: grpc.aio.Server
    host: str
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]
    grace_s: float

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(self.grace_s if grace_s is None else grace_s)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_server(config: ServerConfig, services: Sequence[ServiceSpec]) -> RunningServer:
    """Start a grpc.aio server for `services` with health, reflection, auth and error mapping."""
    interceptors: list[grpc.aio.ServerInterceptor] = []
    api_key = config.resolved_api_key()
    if api_key:
        interceptors.append(_ApiKeyInterceptor(api_key))
    interceptors.append(_ErrorMappingInterceptor())
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for spec in services:
        spec.add_to_server(spec.servicer, server)
    names = tuple(spec.full_name for spec in services)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    if credentials is None:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    else:
        port = server.add_secure_port(f"{config.host}:{config.port}", credentials)
    if port == 0:
        raise errors.Unavailable(f"could not bind {config.host}:{config.port}; is the port in use?")
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    auth, tls = "on" if api_key else "off", "off" if credentials is None else "on"
    logger.info("serving %s on %s:%d (auth %s, tls %s)", ", ".join(names), config.host, port, auth, tls)
    return RunningServer(server, config.host, port, health_servicer, names, config.grace_s)


async def serve_until_signal(running: RunningServer, on_stop: Callable[[], Awaitable[None]] | None = None) -> None:
    """Block until SIGINT/SIGTERM, then stop gracefully (entry points call this last)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(running.wait_for_termination())
    signalled = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, signalled}, return_when=asyncio.FIRST_COMPLETED)
    if on_stop is not None:
        await on_stop()
    await running.stop()
    waiter.cancel()
    signalled.cancel()
