"""Client channels to Anvil services: message-size caps, the API key on every call, and TLS when the
environment asks for it (protos.tls: `ANVIL_TLS_CA`, and a client certificate for mutual TLS).

grpc.aio files each client interceptor under one call kind only (an if/elif on its base classes), so
the `authorization: Bearer <key>` header needs one interceptor class per kind.
"""

from __future__ import annotations

import grpc

from protos.tls import channel_credentials

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message a channel or server accepts by default (weight chunks and batches must fit)."""


def _with_auth(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AuthHeader:
    """Adds `authorization: Bearer <key>` to a call's metadata."""

    def __init__(self, api_key: str) -> None:
        self._header = ("authorization", f"Bearer {api_key}")

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return _with_auth(details, self._header)


class _UnaryUnaryAuth(_AuthHeader, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self.details(client_call_details), request)


class _UnaryStreamAuth(_AuthHeader, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self.details(client_call_details), request)


class _StreamUnaryAuth(_AuthHeader, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self.details(client_call_details), request_iterator)


class _StreamStreamAuth(_AuthHeader, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(self.details(client_call_details), request_iterator)


def open_channel(
    address: str, api_key: str | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.aio.Channel:
    """A grpc.aio channel to `address` that sends the API key (if any) on every call; TLS when
    $ANVIL_TLS_CA is set (protos.tls), plain text otherwise."""
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    interceptors = (
        [kind(api_key) for kind in (_UnaryUnaryAuth, _UnaryStreamAuth, _StreamUnaryAuth, _StreamStreamAuth)]
        if api_key
        else None
    )
    credentials = channel_credentials()
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
