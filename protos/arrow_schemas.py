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

`validate_batch` is the gate every service passes a batch through before touching state; its errors name
the row and the column so the sender can fix them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
_TARGET_SHAPED = ("weights",)
_POSITION_SHAPED = ("logprobs", "advantages", "sequence_ratio_mask", "sampler_versions")


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


def validate_batch(table: pa.Table | pa.RecordBatch, vocab_size: int | None = None) -> pa.Table:
    """Check a batch against BATCH_SCHEMA and its shape rules; return it as a Table or raise InvalidArgument.

    Rejects: no rows; unknown or missing columns; wrong column types; nulls; empty model_input; ragged
    per-token columns; token ids < 0 or >= vocab_size; NaN or infinite floats.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if table.num_rows == 0:
        raise InvalidArgument("batch has no rows: send at least one datum")
    _check_columns(table)
    table = table.combine_chunks()
    for name in table.column_names:
        _check_no_nulls(table, name)
    k_per_row = _targets_per_position(table)
    n_per_row = pc.list_value_length(table["model_input"]).to_numpy(zero_copy_only=False)
    empty = np.flatnonzero(n_per_row == 0)
    if empty.size:
        raise InvalidArgument(f"row {empty[0]}: model_input is empty; every datum needs at least one token")
    _check_lengths(table, "target_tokens", n_per_row * k_per_row, "len(model_input) * targets_per_position")
    for name in _TARGET_SHAPED:
        if name in table.column_names:
            _check_lengths(table, name, n_per_row * k_per_row, "len(target_tokens)")
    for name in _POSITION_SHAPED:
        if name in table.column_names:
            _check_lengths(table, name, n_per_row, "len(model_input)")
    if "routed_experts" in table.column_names:
        _check_routes(table, n_per_row)
    for name in TOKEN_LIST_COLUMNS:
        _check_token_range(table, name, vocab_size)
    for name in (*FLOAT_LIST_COLUMNS, "reward"):
        if name in table.column_names:
            _check_finite(table, name)
    return table


def _check_columns(table: pa.Table) -> None:
    unknown = [name for name in table.column_names if name not in BATCH_SCHEMA.names]
    if unknown:
        raise InvalidArgument(f"unknown column(s) {unknown}; allowed columns are {BATCH_SCHEMA.names}")
    missing = [name for name in REQUIRED_COLUMNS if name not in table.column_names]
    if missing:
        raise InvalidArgument(f"missing required column(s) {missing}")
    if len(set(table.column_names)) != len(table.column_names):
        raise InvalidArgument(f"duplicate column names in {table.column_names}")
    for name in table.column_names:
        expected, actual = BATCH_SCHEMA.field(name).type, table.schema.field(name).type
        if not _same_type(actual, expected):
            raise InvalidArgument(f"column {name!r} has type {actual}; expected {expected}")


def _same_type(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores list child names and nullability (writers in other languages differ)."""
    if pa.types.is_list(expected):
        return pa.types.is_list(actual) and actual.value_type == expected.value_type
    return actual == expected


def _check_no_nulls(table: pa.Table, name: str) -> None:
    column = table[name]
    if column.null_count:  # null counts are metadata: the masks are built only to name the row
        nulls = column.is_null().to_numpy(zero_copy_only=False)
        raise InvalidArgument(f"row {int(np.flatnonzero(nulls)[0])}: column {name!r} is null")
    if pa.types.is_list(column.type):
        flat = pc.list_flatten(column)
        if flat.null_count:
            null_values = flat.is_null().to_numpy(zero_copy_only=False)
            row = _row_of_flat_index(column, int(np.flatnonzero(null_values)[0]))
            raise InvalidArgument(f"row {row}: column {name!r} contains a null value")


def _targets_per_position(table: pa.Table) -> np.ndarray:
    if "targets_per_position" not in table.column_names:
        return np.ones(table.num_rows, dtype=np.int64)
    k = table["targets_per_position"].to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero(k < 1)
    if bad.size:
        raise InvalidArgument(f"row {bad[0]}: targets_per_position is {k[bad[0]]}; it must be >= 1")
    return k


def _check_lengths(table: pa.Table, name: str, expected: np.ndarray, what: str) -> None:
    lengths = pc.list_value_length(table[name]).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(lengths != expected)
    if bad.size:
        row = int(bad[0])
        raise InvalidArgument(
            f"row {row}: column {name!r} has {lengths[row]} values but {what} is {expected[row]}; "
            "per-token columns must line up"
        )


def _check_routes(table: pa.Table, n_per_row: np.ndarray) -> None:
    """routed_experts: a whole number of values per position (the layers x experts per token a learner checks
    against its model), none negative."""
    lengths = pc.list_value_length(table["routed_experts"]).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((lengths % n_per_row != 0) | (lengths == 0))
    if bad.size:
        row = int(bad[0])
        raise InvalidArgument(
            f"row {row}: column 'routed_experts' has {lengths[row]} values for {n_per_row[row]} positions; it must "
            "hold moe_layers * top_k expert ids per position of model_input"
        )
    low = pc.min(pc.list_flatten(table["routed_experts"])).as_py()
    if low is not None and low < 0:
        raise InvalidArgument(f"column 'routed_experts' holds expert id {low}; expert ids are >= 0")


def _check_token_range(table: pa.Table, name: str, vocab_size: int | None) -> None:
    column = table[name]
    flat = pc.list_flatten(column)
    low_high = pc.min_max(flat)  # one pass, no temporaries: the common case (all in range) stops here
    low, high = low_high["min"].as_py(), low_high["max"].as_py()
    if low is None or (low >= 0 and (vocab_size is None or high < vocab_size)):
        return
    values = flat.to_numpy(zero_copy_only=False)
    bad = values < 0
    if vocab_size is not None:
        bad |= values >= vocab_size
    flat_index = int(np.flatnonzero(bad)[0])
    row = _row_of_flat_index(column, flat_index)
    limit = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
    raise InvalidArgument(
        f"row {row}: column {name!r} holds token id {values[flat_index]}; token ids must be in {limit}"
    )


def _check_finite(table: pa.Table, name: str) -> None:
    column = table[name]
    is_list = pa.types.is_list(column.type)
    values = (pc.list_flatten(column) if is_list else column).to_numpy(zero_copy_only=False)
    # A finite sum proves every value finite (NaN and inf propagate through IEEE addition): one pass, no
    # temporaries. A sum that overflows float32 only sends a valid batch on to the exact check below.
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(values)):
            return
    bad = ~np.isfinite(values)
    if bad.any():
        flat_index = int(np.flatnonzero(bad)[0])
        row = _row_of_flat_index(column, flat_index) if is_list else flat_index
        raise InvalidArgument(f"row {row}: column {name!r} holds {values[flat_index]}; values must be finite")


def _row_of_flat_index(column: pa.ChunkedArray | pa.Array, flat_index: int) -> int:
    return int(pc.list_parent_indices(column).to_numpy(zero_copy_only=False)[flat_index])


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
