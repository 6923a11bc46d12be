"""The Tinker-typed client's Datum -> Arrow conversion gives the bytes of a plain numpy conversion."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.client.convert import datum_row
from coordinator.client.types import Datum, EncodedTextChunk, ModelInput, TensorData
from protos.arrow_schemas import encode_batch, make_batch
from protos.batch_encoding import encode_rows
from protos.datums import datum_row as protos_datum_row
from protos.errors import InvalidArgument

floats = st.one_of(
    st.floats(width=32, allow_nan=False),
    st.floats(min_value=-1e30, max_value=1e30),  # rounded to float32 by both paths
    st.integers(-(2**40), 2**40),  # ints in a float tensor
)


def plain_row(datum: Datum, index: int) -> dict:
    """The conversion before the struct fast path: numpy from the Python lists, int64 ids."""
    tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
    return protos_datum_row(tokens, {k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()}, f"datum {index}")[0]


@st.composite
def data(draw) -> list[Datum]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        n, k = draw(st.integers(1, 12)), draw(st.sampled_from([None, 2]))
        chunks = draw(st.lists(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=4), min_size=1, max_size=3))
        tokens = [t for chunk in chunks for t in chunk][:n] or [0]
        n = len(tokens)
        width = n * (k or 1)
        targets = draw(st.lists(st.integers(0, 2**31 - 1), min_size=width, max_size=width))
        inputs = {"target_tokens": TensorData(targets, "int64", [n, k] if k else [n])}
        for name in draw(st.sets(st.sampled_from(["weights", "logprobs", "advantages"]))):
            size = width if name == "weights" else n
            inputs[name] = TensorData(draw(st.lists(floats, min_size=size, max_size=size)), "float32", [size])
        out.append(Datum(ModelInput([EncodedTextChunk(tokens)]), inputs))
    return out


@settings(max_examples=80, deadline=None)
@given(data())
def test_fast_conversion_is_byte_identical(batch):
    fast = encode_rows([datum_row(d, i) for i, d in enumerate(batch)])
    assert fast == encode_batch(make_batch([plain_row(d, i) for i, d in enumerate(batch)]))


def test_multi_chunk_model_input_is_joined_in_order():
    datum = Datum(
        ModelInput([EncodedTextChunk([1, 2]), EncodedTextChunk([3])]),
        {"target_tokens": TensorData([2, 3, 4], "int64", [3])},
    )
    assert datum_row(datum)["model_input"].tolist() == [1, 2, 3]


def test_values_struct_refuses_take_the_general_path_and_its_error():
    datum = Datum(ModelInput.from_ints([1, 2**40]), {"target_tokens": TensorData([2, 3], "int64", [2])})
    with pytest.raises(InvalidArgument, match="model_input"):
        make_batch([datum_row(datum)])
    huge = Datum(
        ModelInput.from_ints([1]), {"target_tokens": TensorData([2], "int64"), "weights": TensorData([1e39], "float32")}
    )
    assert np.isinf(datum_row(huge)["weights"]).all()  # numpy's float32 overflow, as before; validation rejects it
