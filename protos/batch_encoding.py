"""Trajectory batches from numpy rows straight to wire bytes, with one copy of the token data.

The plain path (`make_batch` → `encode_batch` → a request message → `SerializeToString`) copies every
token four times on the sending side: concatenating the rows into Arrow columns, writing the IPC stream,
the protobuf message taking the payload, and serialising it. At a few GB/s that is most of the time a
ForwardBackward spends beside gRPC itself. Here:

- list columns whose rows are already numpy arrays of the column's exact type are not concatenated:
  pyarrow writes the IPC stream of a table whose value buffers are uninitialised placeholders of the right
  size (never read), into a sink that keeps each write as a zero-copy part, and each placeholder part is
  replaced by the rows themselves (`encode_rows`);
- the request is framed by hand around those parts (`request_bytes`): the serialised message without its
  batch, then the `batch` field's tag and length and the `arrow_ipc_stream` field's tag and length. The
  protobuf wire format allows fields in any order, so every parser reads the same message
  `message.batch.arrow_ipc_stream = encode_batch(make_batch(rows))` would give (tests check bytes).

`b"".join` of the parts is then the single copy. Anything the splice cannot take (other dtypes, Python
lists, casts that must be checked) goes through `column_array`, which makes the same Arrow values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from google.protobuf.message import Message

from protos.arrow_schemas import BATCH_SCHEMA, PartsSink, batch_column_names, column_array, encode_batch, make_batch
from protos.wire_scan import varint


def encode_rows(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """`encode_batch(make_batch(rows))`, byte for byte, copying each row's values once."""
    return b"".join(ipc_parts(rows))


def request_bytes(message: Message, rows: Sequence[Mapping[str, Any]]) -> bytes:
    """The serialised `message` (a Forward/ForwardBackwardRequest whose batch is unset) with the batch of
    `rows` as its `batch.arrow_ipc_stream`: what a gRPC call with `request_serializer=None` sends."""
    if message.HasField("batch"):
        raise ValueError("request_bytes frames the batch itself: leave message.batch unset")
    batch_field = message.DESCRIPTOR.fields_by_name["batch"]
    payload_field = batch_field.message_type.fields_by_name["arrow_ipc_stream"]
    parts = [memoryview(part) for part in ipc_parts(rows)]
    size = sum(part.nbytes for part in parts)
    inner = varint(payload_field.number << 3 | 2) + varint(size)
    outer = varint(batch_field.number << 3 | 2) + varint(len(inner) + size)
    return b"".join([message.SerializeToString(), outer, inner, *parts])


def ipc_parts(rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The IPC stream of `rows` as buffer-protocol parts to join: metadata, and column values as the rows'
    own arrays where they can be spliced in."""
    names = batch_column_names(rows)
    arrays, splices = [], {}
    for name in names:
        column = [row.get(name) for row in rows]
        list_type = BATCH_SCHEMA.field(name).type
        spliced = _placeholder_column(column, list_type) if pa.types.is_list(list_type) else None
        if spliced is None:
            arrays.append(column_array(name, column))
        else:
            array, placeholder = spliced
            arrays.append(array)
            splices[placeholder.address] = (placeholder.size, column)
    table = pa.Table.from_arrays(arrays, schema=pa.schema([BATCH_SCHEMA.field(n) for n in names]))
    sink = PartsSink()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    parts: list[Any] = []
    for part in sink.parts:
        spliced = splices.get(part.address) if isinstance(part, pa.Buffer) else None
        if spliced is not None and spliced[0] == part.size:
            del splices[part.address]
            parts.extend(spliced[1])
        else:
            parts.append(part)
    if splices:  # pyarrow wrote a placeholder other than as one zero-copy part: never send its bytes
        return [encode_batch(make_batch(rows))]
    return parts


def _placeholder_column(column: list[Any], list_type: pa.ListType) -> tuple[pa.ListArray, pa.Buffer] | None:
    """A list column with the rows' offsets and an uninitialised values buffer (returned beside it);
    None unless every row is a non-empty-in-total, C-contiguous 1-D array of exactly the value type."""
    dtype = np.dtype(list_type.value_type.to_pandas_dtype())
    if not all(
        isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == dtype and value.flags.c_contiguous
        for value in column
    ):
        return None
    lengths = np.fromiter((len(value) for value in column), dtype=np.int64, count=len(column))
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    if total == 0 or total > np.iinfo(np.int32).max:
        return None
    placeholder = pa.allocate_buffer(total * dtype.itemsize)
    values = pa.Array.from_buffers(list_type.value_type, total, [None, placeholder], null_count=0)
    array = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=list_type)
    return array, placeholder
