"""Trajectory batches: Arrow IPC round trips and every rejection of validate_batch."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.arrow_schemas import (
    BATCH_SCHEMA,
    decode_batch,
    decode_outputs,
    encode_batch,
    encode_outputs,
    make_batch,
)
from protos.batch_validation import validate_batch
from protos.errors import InvalidArgument

VOCAB = 100


def row(n: int = 4, **overrides):
    base = {
        "model_input": list(range(1, n + 1)),
        "target_tokens": list(range(2, n + 2)),
        "weights": [1.0] * n,
        "logprobs": [-0.5] * n,
        "advantages": [0.25] * n,
        "sampler_version": 3,
        "group_id": 7,
        "reward": 1.0,
    }
    base.update(overrides)
    return base


def test_round_trip_keeps_every_column_and_value():
    rows = [row(3), row(5, reward=0.0, group_id=8)]
    table = validate_batch(decode_batch(encode_batch(make_batch(rows))), vocab_size=VOCAB)
    assert table.column_names == [name for name in BATCH_SCHEMA.names if name in rows[0]]
    assert table.to_pylist() == rows  # every value here is exact in float32


def test_round_trip_of_required_columns_only():
    table = make_batch([{"model_input": [1, 2], "target_tokens": [2, 3]}])
    decoded = validate_batch(decode_batch(encode_batch(table)), vocab_size=VOCAB)
    assert decoded.column_names == ["model_input", "target_tokens"]
    assert decoded.to_pylist() == [{"model_input": [1, 2], "target_tokens": [2, 3]}]


def test_multi_target_rows_are_flattened_n_times_k():
    table = make_batch(
        [
            {
                "model_input": [1, 2],
                "target_tokens": [3, 4, 5, 6],
                "weights": [0.5, 0.5, -1.0, 2.0],
                "targets_per_position": 2,
            }
        ]
    )
    validate_batch(table, vocab_size=VOCAB)
    bad = make_batch([{"model_input": [1, 2], "target_tokens": [3, 4, 5], "targets_per_position": 2}])
    with pytest.raises(InvalidArgument, match=r"row 0: column 'target_tokens' has 3 values"):
        validate_batch(bad)


def test_batch_written_by_a_plain_pyarrow_writer_validates():
    """Another language's writer names list children differently; only the value types must match."""
    element = pa.list_(pa.field("element", pa.int32(), nullable=False))
    table = pa.table({"model_input": pa.array([[1, 2]], element), "target_tokens": pa.array([[2, 3]], element)})
    validate_batch(decode_batch(encode_batch(table)), vocab_size=VOCAB)


token_lists = st.lists(st.integers(min_value=0, max_value=VOCAB - 1), min_size=1, max_size=16)
finite_floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@st.composite
def datum(draw):
    model_input = draw(token_lists)
    n = len(model_input)
    targets = draw(st.lists(st.integers(0, VOCAB - 1), min_size=n, max_size=n))
    weights = draw(st.lists(finite_floats, min_size=n, max_size=n))
    advantages = draw(st.lists(finite_floats, min_size=n, max_size=n))
    return {
        "model_input": model_input,
        "target_tokens": targets,
        "weights": weights,
        "advantages": advantages,
        "sampler_version": draw(st.integers(0, 2**40)),
        "reward": draw(finite_floats),
    }


@settings(max_examples=60, deadline=None)
@given(st.lists(datum(), min_size=1, max_size=8))
def test_round_trip_property(rows):
    decoded = validate_batch(decode_batch(encode_batch(make_batch(rows))), vocab_size=VOCAB)
    assert decoded.num_rows == len(rows)
    for got, want in zip(decoded.to_pylist(), rows, strict=True):
        assert got["model_input"] == want["model_input"]
        assert got["target_tokens"] == want["target_tokens"]
        assert got["sampler_version"] == want["sampler_version"]
        np.testing.assert_array_equal(np.float32(got["weights"]), np.float32(want["weights"]))
        np.testing.assert_array_equal(np.float32(got["advantages"]), np.float32(want["advantages"]))
        assert np.float32(got["reward"]) == np.float32(want["reward"])


def test_outputs_round_trip():
    rows = [np.array([-0.1, -2.0], dtype=np.float32), np.array([-3.5], dtype=np.float32)]
    decoded = decode_outputs(encode_outputs(rows))
    assert len(decoded) == 2
    for got, want in zip(decoded, rows, strict=True):
        np.testing.assert_array_equal(got, want)


# --- rejections: each names the row and the field ----------------------------------------------------


def test_rejects_empty_batch():
    empty = make_batch([row()]).slice(0, 0)
    with pytest.raises(InvalidArgument, match="no rows"):
        validate_batch(empty)
    with pytest.raises(InvalidArgument, match="empty"):
        make_batch([])


def test_rejects_unknown_column():
    table = make_batch([row()]).append_column("mask", pa.array([[1, 1, 1, 1]], pa.list_(pa.int32())))
    with pytest.raises(InvalidArgument, match=r"unknown column\(s\) \['mask'\]"):
        validate_batch(table)


def test_rejects_missing_required_column():
    table = make_batch([{"model_input": [1, 2]}])
    with pytest.raises(InvalidArgument, match=r"missing required column\(s\) \['target_tokens'\]"):
        validate_batch(table)


@pytest.mark.parametrize(
    ("column", "array"),
    [
        ("model_input", pa.array([[1, 2]], pa.list_(pa.int64()))),
        ("weights", pa.array([[1.0, 1.0]], pa.list_(pa.float64()))),
        ("sampler_version", pa.array([1], pa.int32())),
        ("reward", pa.array(["high"])),
    ],
)
def test_rejects_wrong_column_type(column, array):
    columns = {
        "model_input": pa.array([[1, 2]], pa.list_(pa.int32())),
        "target_tokens": pa.array([[2, 3]], pa.list_(pa.int32())),
    }
    columns[column] = array
    with pytest.raises(InvalidArgument, match=rf"column '{column}' has type .*; expected"):
        validate_batch(pa.table(columns))


@pytest.mark.parametrize(
    ("column", "bad_row", "message"),
    [
        ("target_tokens", {"target_tokens": [1, 2, 3]}, "column 'target_tokens' has 3 values but len"),
        ("weights", {"weights": [1.0] * 5}, "column 'weights' has 5 values"),
        ("logprobs", {"logprobs": [0.0]}, "column 'logprobs' has 1 values"),
        ("advantages", {"advantages": []}, "column 'advantages' has 0 values"),
    ],
)
def test_rejects_ragged_rows_naming_the_row(column, bad_row, message):
    table = make_batch([row(), row(**bad_row)])
    with pytest.raises(InvalidArgument, match=rf"row 1: {message}"):
        validate_batch(table)


def test_rejects_empty_model_input():
    with pytest.raises(InvalidArgument, match="row 0: model_input is empty"):
        validate_batch(make_batch([{"model_input": [], "target_tokens": []}]))


@pytest.mark.parametrize("column", ["model_input", "target_tokens"])
@pytest.mark.parametrize("token", [-1, VOCAB, VOCAB + 5])
def test_rejects_out_of_vocab_tokens(column, token):
    tokens = [1, 2, token, 3]
    table = make_batch([row(), row(**{column: tokens})])
    with pytest.raises(
        InvalidArgument, match=rf"row 1: column '{column}' holds token id {token}; token ids must be in \[0, {VOCAB}\)"
    ):
        validate_batch(table, vocab_size=VOCAB)


def test_negative_tokens_rejected_even_without_vocab_size():
    with pytest.raises(InvalidArgument, match="token ids must be in >= 0"):
        validate_batch(make_batch([row(model_input=[1, -3, 2, 2])]))


@pytest.mark.parametrize("column", ["weights", "logprobs", "advantages"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_rejects_non_finite_floats(column, value):
    table = make_batch([row(), row(), row(**{column: [0.0, 0.0, value, 0.0]})])
    with pytest.raises(InvalidArgument, match=rf"row 2: column '{column}' holds .*; values must be finite"):
        validate_batch(table)


def test_rejects_non_finite_reward():
    with pytest.raises(InvalidArgument, match="row 0: column 'reward' holds nan"):
        validate_batch(make_batch([row(reward=math.nan)]))


def test_rejects_nulls():
    with pytest.raises(InvalidArgument, match="row 1: column 'sampler_version' is null"):
        validate_batch(make_batch([row(), row(sampler_version=None)]))
    with pytest.raises(InvalidArgument, match="row 0: column 'weights' contains a null value"):
        validate_batch(make_batch([row(weights=[1.0, None, 1.0, 1.0])]))


def test_rejects_bad_targets_per_position():
    with pytest.raises(InvalidArgument, match="row 0: targets_per_position is 0"):
        validate_batch(make_batch([row(targets_per_position=0)]))


def test_rejects_bytes_that_are_not_arrow():
    with pytest.raises(InvalidArgument, match="not a valid Arrow IPC stream"):
        decode_batch(b"definitely not arrow")
    with pytest.raises(InvalidArgument, match="is empty"):
        decode_batch(b"")
