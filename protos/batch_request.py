"""The learner's batch-carrying requests (Forward, ForwardBackward) decoded without copying the batch.

protobuf's generated deserializer copies `batch.arrow_ipc_stream` into its arena, and reading the field
copies it again into a new bytes object: two passes over megabytes of fresh pages per request, more than
the rest of ingestion (bench/data_plane.py measures it). `batch_request_parser` instead keeps the Arrow
bytes as a view of the received gRPC message (Arrow decodes from that view without copying) and gives
protobuf only the rest of the message, a few hundred bytes.

The exactly-once fingerprint (`BatchRequest.fingerprint`) then hashes those two parts as they are:
xxh3_128 of the small remainder, serialised deterministically, followed by the Arrow bytes. A request
built in this process (`as_batch_request`) gets the same fingerprint as the same request received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import xxhash
from google.protobuf.message import Message

from protos.wire_scan import fields

_BATCH_FIELD = 3
"""ForwardRequest.batch and ForwardBackwardRequest.batch (DataBatch)."""
_ARROW_FIELD = 1
"""DataBatch.arrow_ipc_stream."""
_LENGTH_DELIMITED = 2


@dataclass(frozen=True)
class BatchRequest:
    """A Forward/ForwardBackward request: every field but the batch in `message`, the batch's Arrow IPC
    bytes (a view of the received message, or the field itself) in `arrow_ipc_stream`."""

    message: Message
    arrow_ipc_stream: memoryview | bytes

    @property
    def session_id(self) -> str:
        return self.message.session_id

    @property
    def seq_id(self) -> int:
        return self.message.seq_id

    @property
    def loss_fn(self) -> str:
        return self.message.loss_fn

    @property
    def loss_fn_config(self) -> Mapping[str, float]:
        return self.message.loss_fn_config

    def fingerprint(self) -> bytes:
        """What tells a retry (same content) from another request under a reused seq_id
        (servicekit.sequencer): a hash of both parts, no copy of the batch."""
        hasher = xxhash.xxh3_128(self.message.SerializeToString(deterministic=True))
        hasher.update(self.arrow_ipc_stream)
        return hasher.digest()


def batch_request_parser(message_type: type[Message]) -> Callable[[bytes], BatchRequest]:
    """A gRPC request deserializer for `message_type` that leaves the Arrow bytes where they arrived.

    Fields may come in any order and repeat, as protobuf allows: the last `arrow_ipc_stream` wins (a
    repeated `batch` merges, and its one field is a scalar), everything else goes to protobuf as sent."""
    name = message_type.DESCRIPTOR.name

    def parse(data: bytes) -> BatchRequest:
        view = memoryview(data).cast("B")
        rest, arrow = bytearray(), memoryview(b"")
        for number, wire, key_start, start, end in fields(view, name):
            if number != _BATCH_FIELD or wire != _LENGTH_DELIMITED:
                rest += view[key_start:end]
                continue
            for inner, inner_wire, _, inner_start, inner_end in fields(view[start:end], f"{name}.batch"):
                if inner == _ARROW_FIELD and inner_wire == _LENGTH_DELIMITED:
                    arrow = view[start + inner_start : start + inner_end]
        return BatchRequest(message_type.FromString(bytes(rest)), arrow)

    return parse


def as_batch_request(request: Any) -> BatchRequest:
    """A BatchRequest as it is, or one made from a whole protobuf request (a caller in this process)."""
    if isinstance(request, BatchRequest):
        return request
    rest = type(request)()
    rest.CopyFrom(request)
    rest.ClearField("batch")
    return BatchRequest(rest, request.batch.arrow_ipc_stream)
