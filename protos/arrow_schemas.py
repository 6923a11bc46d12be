"""The Arrow schema of trajectory batches, its IPC encoding, and its validation.

One row per datum (Tinker's `Datum`): the model reads `model_input` (N tokens) and position i predicts
`target_tokens[i]`. Per-token loss inputs have the length of `target_tokens`. With K targets per
position (Tinker's `[N, K]` targets, used for distillation), `target_tokens` and `weights` are stored
flattened row-major (length N*K) and `targets_per_position` holds K.

Columns (only the first two are required; which optional ones a loss needs is the learner's concern):

    model_input          list<int32>    tokens fed to the model, N >= 1
    target_tokens        list<int32>    N*K target ids
    weights              list<float32>  N*K per-target weights (cross_entropy; any sign)
    logprobs             list<float32>  N sampler logprobs of the targets (RL losses)
    advantages           list<float32>  N per-token advantages (RL losses)
    sequence_ratio_mask  list<float32>  N, 1 on the tokens whose ratio forms GSPO's sequence ratio
    targets_per_position int32          K, default 1
    sampler_version      int64          weight version that sampled the row (the oldest, with per-token ones)
    sampler_versions     list<int64>    N, the version that sampled each target token (-1: a prompt position);
                                        in-flight updates split a completion (docs/weight-sync.md)
    routed_experts       list<int32>    N*L*k, the experts each position was routed to when sampled ([N, L, k]
                                        row-major: L MoE layers, k experts per token), for routing replay
    group_id             int64          rollout group the row belongs to
    reward               float32        the row's scalar reward

`protos.batch_validation.validate_batch` is the gate every service passes a batch through before touching
state; its errors name the row and the column so the sender can fix them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from protos.errors import InvalidArgument

TOKEN_LIST_COLUMNS = ("model_input", "target_tokens")
FLOAT_LIST_COLUMNS = ("weights", "logprobs", "advantages", "sequence_ratio_mask")
REQUIRED_COLUMNS = TOKEN_LIST_COLUMNS

BATCH_SCHEMA = pa.schema(
    [
        pa.field("model_input", pa.list_(pa.int32()), nullable=False),
        pa.field("target_tokens", pa.list_(pa.int32()), nullable=False),
        pa.field("weights", pa.list_(pa.float32())),
        pa.field("logprobs", pa.list_(pa.float32())),
        pa.field("advantages", pa.list_(pa.float32())),
        pa.field("sequence_ratio_mask", pa.list_(pa.float32())),
        pa.field("targets_per_position", pa.int32()),
        pa.field("sampler_version", pa.int64()),
        pa.field("sampler_versions", pa.list_(pa.int64())),
        pa.field("routed_experts", pa.list_(pa.int32())),
        pa.field("group_id", pa.int64()),
        pa.field("reward", pa.float32()),
    ]
)
"""Every column a trajectory batch may carry; a batch holds the required ones and any subset of the rest."""

OUTPUT_SCHEMA = pa.schema([pa.field("logprobs", pa.list_(pa.float32()), nullable=False)])
"""Per-datum outputs of Forward/ForwardBackward: learner logprobs shaped like that row's target_tokens."""

# Columns whose per-token length must equal len(target_tokens) (the flattened N*K), or N.
TARGET_SHAPED = ("weights",)
POSITION_SHAPED = ("logprobs", "advantages", "sequence_ratio_mask", "sampler_versions")


def make_batch(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Build a typed batch from dicts of Python lists / numpy arrays (keys are column names)."""
    names = batch_column_names(rows)
    arrays = [column_array(name, [row.get(name) for row in rows]) for name in names]
    return pa.Table.from_arrays(arrays, schema=pa.schema([BATCH_SCHEMA.field(n) for n in names]))


def batch_column_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The schema's columns that `rows` carry, in schema order; InvalidArgument for no rows or unknown keys."""
    if not rows:
        raise InvalidArgument("batch is empty: send at least one datum")
    unknown = sorted({key for row in rows for key in row} - set(BATCH_SCHEMA.names))
    if unknown:
        raise InvalidArgument(f"unknown column(s) {unknown}; allowed columns are {BATCH_SCHEMA.names}")
    return [f.name for f in BATCH_SCHEMA if any(f.name in row for row in rows)]


def column_array(name: str, column: list[Any]) -> pa.Array:
    """One column of `make_batch` (a value per row, None where a row lacks it), typed as BATCH_SCHEMA says."""
    field = BATCH_SCHEMA.field(name)
    array = _list_array_from_numpy(column, field.type) if pa.types.is_list(field.type) else None
    if array is None:
        try:
            array = pa.array([_to_python(value) for value in column], type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise InvalidArgument(f"column {name!r} cannot be stored as {field.type}: {exc}") from exc
    return array


def _list_array_from_numpy(column: list[Any], list_type: pa.ListType) -> pa.ListArray | None:
    """A list column built straight from 1-D numpy rows (one concatenation, no Python per element).

    Returns None, for the general path to handle (and to word any error), unless every row is a 1-D
    numeric numpy array whose values convert to the column's type safely.
    """
    if not all(isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf" for value in column):
        return None
    offsets = np.cumsum([0, *(len(value) for value in column)], dtype=np.int64)
    if offsets[-1] > np.iinfo(np.int32).max:
        return None
    try:
        values = pa.array(np.concatenate(column), type=list_type.value_type)  # safe cast: no silent overflow
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=list_type)


def _to_python(value: Any) -> Any:
    """numpy arrays and scalars, torch tensors -> Python values; anything else as it is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (list, tuple)) else value


class PartsSink:
    """A write-only file for pyarrow's IPC writer that keeps each write as given (column buffers zero-copy): joining
    the parts is the one copy of the payload (BufferOutputStream copies in, reallocates, `to_pybytes` copies)."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.closed = False

    def write(self, data: Any) -> int:
        self.parts.append(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        self.closed = True


def encode_batch(table: pa.Table | pa.RecordBatch) -> bytes:
    """Serialise a table as Arrow IPC *stream* bytes (the DataBatch.arrow_ipc_stream payload)."""
    sink = PartsSink()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write(table)
    return b"".join(sink.parts)


def decode_batch(payload: bytes) -> pa.Table:
    """Parse Arrow IPC stream bytes; malformed bytes are INVALID_ARGUMENT, not a crash."""
    if not payload:
        raise InvalidArgument("batch.arrow_ipc_stream is empty: send an Arrow IPC stream with at least one row")
    try:
        with pa.ipc.open_stream(pa.py_buffer(payload)) as reader:
            table = reader.read_all()
        table.validate(full=True)  # the reader checks metadata only, not offsets into the buffers
        return table
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: e.g. a name that is not UTF-8
        raise InvalidArgument(f"batch.arrow_ipc_stream is not a valid Arrow IPC stream: {exc}") from exc


def encode_outputs(logprobs_per_row: Iterable[Sequence[float] | np.ndarray]) -> bytes:
    """Encode per-datum learner logprobs (each shaped like its row's target_tokens) as Arrow IPC bytes."""
    values = [_to_python(row) for row in logprobs_per_row]
    table = pa.Table.from_arrays([pa.array(values, type=pa.list_(pa.float32()))], schema=OUTPUT_SCHEMA)
    return encode_batch(table)


def decode_outputs(payload: bytes) -> list[np.ndarray]:
    """Decode Forward/ForwardBackward outputs into one float32 array per datum."""
    table = decode_batch(payload)
    if table.schema != OUTPUT_SCHEMA:
        raise InvalidArgument(f"outputs have schema {table.schema}; expected {OUTPUT_SCHEMA}")
    return [np.asarray(row, dtype=np.float32) for row in table["logprobs"].to_pylist()]
