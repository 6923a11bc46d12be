"""Validation of trajectory batches against protos.arrow_schemas.BATCH_SCHEMA and its shape rules: the gate
every service passes a batch through before touching state. Each error names the row and the column, so the
sender can fix them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from protos.arrow_schemas import (
    BATCH_SCHEMA,
    FLOAT_LIST_COLUMNS,
    POSITION_SHAPED,
    REQUIRED_COLUMNS,
    TARGET_SHAPED,
    TOKEN_LIST_COLUMNS,
)
from protos.errors import InvalidArgument


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
    for name in TARGET_SHAPED:
        if name in table.column_names:
            _check_lengths(table, name, n_per_row * k_per_row, "len(target_tokens)")
    for name in POSITION_SHAPED:
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
