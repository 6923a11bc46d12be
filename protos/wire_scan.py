"""Protobuf wire format by hand, for the few requests whose bulk bytes must not be copied.

protobuf's Python parser copies every bytes field into the message, and each read of the field copies it
again. For the requests that carry megabytes (PushWeights chunks, Forward/ForwardBackward Arrow batches)
the receivers instead walk the top-level fields here, keep the bulk field as a view of the received
message, and hand only the small remainder to protobuf (`weights_codec.parse_push_request`,
`batch_request.batch_request_parser`). Encoding, the sender's side, is `varint`.
"""

from __future__ import annotations

from collections.abc import Iterator

from protos.errors import InvalidArgument


def varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def read_varint(view: memoryview, at: int, message: str = "message") -> tuple[int, int]:
    """The varint starting at `at`, and the position after it."""
    value = shift = 0
    while True:
        if at >= len(view):
            raise InvalidArgument(f"malformed {message}: truncated varint")
        byte = view[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def fields(view: memoryview, message: str = "message") -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, key start, value start, end) of each field; for varints value start..end
    is the value's bytes. `message` names what is parsed in the INVALID_ARGUMENT a malformed one gets."""
    at = 0
    while at < len(view):
        key_start = at
        key, at = read_varint(view, at, message)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = read_varint(view, at, message)
        elif wire == 2:
            length, at = read_varint(view, at, message)
            end = at + length
        elif wire in (1, 5):
            end = at + (8 if wire == 1 else 4)
        else:
            raise InvalidArgument(f"malformed {message}: wire type {wire} of field {number}")
        if end > len(view) or number == 0:
            raise InvalidArgument(f"malformed {message}: field {number} runs past the message or is numbered 0")
        yield number, wire, key_start, at, end
        at = end
