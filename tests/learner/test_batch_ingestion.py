"""batch_from_arrow's per-datum views equal a direct per-row conversion, value for value and dtype for dtype."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.batch import batch_from_arrow
from protos.arrow_schemas import decode_batch, encode_batch, make_batch
from protos.batch_validation import validate_batch
from protos.errors import InvalidArgument

VOCAB = 1000
FLOAT_COLUMNS = ("weights", "logprobs", "advantages", "sequence_ratio_mask")


@st.composite
def ragged_batch(draw) -> list[dict]:
    """Random ragged rows, 1 to 3 targets per position, and a random subset of the float columns."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    columns = draw(st.sets(st.sampled_from(FLOAT_COLUMNS)))
    rows = []
    for _ in range(draw(st.integers(1, 8))):
        n, k = draw(st.integers(1, 50)), draw(st.integers(1, 3))
        row = {
            "model_input": rng.integers(0, VOCAB, n).astype(np.int32),
            "target_tokens": rng.integers(0, VOCAB, n * k).astype(np.int32),
            "targets_per_position": k,
        }
        for name in columns:
            row[name] = rng.standard_normal(n * k if name == "weights" else n).astype(np.float32)
        rows.append(row)
    return rows


def reference(payload: bytes) -> list[dict]:
    """The batch row by row through Python lists: slow, obviously right."""
    return validate_batch(decode_batch(payload), vocab_size=VOCAB).to_pylist()


@settings(max_examples=80, deadline=None)
@given(ragged_batch())
def test_views_match_a_row_by_row_conversion(rows):
    payload = encode_batch(make_batch(rows))
    batch = batch_from_arrow(payload, VOCAB)
    expected = reference(payload)
    assert len(batch.data) == len(expected)
    for datum, want in zip(batch.data, expected, strict=True):
        assert datum.model_input.dtype == np.int64 and datum.target_tokens.dtype == np.int64
        assert datum.model_input.tolist() == want["model_input"]
        assert datum.target_tokens.tolist() == want["target_tokens"]
        assert datum.targets_per_position == want["targets_per_position"]
        assert datum.model_input.flags.writeable and datum.target_tokens.flags.writeable  # torch.from_numpy
        assert set(datum.loss_inputs) == set(batch.input_names)
        for name, values in datum.loss_inputs.items():
            assert values.dtype == np.float32
            assert values.tobytes() == np.asarray(want[name], dtype=np.float32).tobytes()


def test_a_datums_views_do_not_overlap_its_neighbours():
    rows = [
        {"model_input": np.array([1, 2], dtype=np.int32), "target_tokens": np.array([3, 4], dtype=np.int32)},
        {"model_input": np.array([5], dtype=np.int32), "target_tokens": np.array([6], dtype=np.int32)},
    ]
    batch = batch_from_arrow(encode_batch(make_batch(rows)), VOCAB)
    batch.data[0].model_input[:] = 0
    assert batch.data[1].model_input.tolist() == [5]


def test_a_memoryview_payload_is_taken_as_bytes():
    payload = encode_batch(make_batch([{"model_input": [1, 2], "target_tokens": [2, 3]}]))
    assert batch_from_arrow(memoryview(payload), VOCAB).data[0].target_tokens.tolist() == [2, 3]


def test_finite_floats_whose_sum_overflows_are_accepted_and_a_nan_is_still_found():
    big = np.full(4, 3e38, dtype=np.float32)
    row = {"model_input": np.arange(4, dtype=np.int32), "target_tokens": np.arange(4, dtype=np.int32)}
    batch_from_arrow(encode_batch(make_batch([{**row, "advantages": big}])), VOCAB)
    nan = big.copy()
    nan[2] = np.nan
    with pytest.raises(InvalidArgument, match=r"row 1: column 'advantages' holds nan"):
        batch_from_arrow(encode_batch(make_batch([{**row, "advantages": big}, {**row, "advantages": nan}])), VOCAB)
