"""Registering a generated servicer with some methods' request deserializers replaced.

The generated `add_XServicer_to_server` fixes each method's deserializer to protobuf's `FromString`. The
methods that carry bulk bytes (PushWeights, Forward, ForwardBackward) parse their requests by hand
instead, keeping the bytes as views of the received message (protos.wire_scan); everything else about
the registration, the handlers and their behaviours stays the generated one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class _Capture:
    """Stands in for the server while the generated function registers: keeps its method handlers."""

    handlers: dict

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def with_request_deserializers(
    add_to_server: Callable[[Any, Any], None], service_name: str, deserializers: dict[str, Callable[[bytes], Any]]
) -> Callable[[Any, grpc.aio.Server], None]:
    """`add_to_server` (a generated registration), with `deserializers` (method name -> parser) in place
    of protobuf's for those methods."""

    def add(servicer: Any, server: grpc.aio.Server) -> None:
        capture = _Capture()
        add_to_server(servicer, capture)
        handlers = dict(capture.handlers)
        for method, deserializer in deserializers.items():
            handlers[method] = handlers[method]._replace(request_deserializer=deserializer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, handlers),))
        server.add_registered_method_handlers(service_name, handlers)

    return add
