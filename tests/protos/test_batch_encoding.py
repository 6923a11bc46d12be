"""The one-copy batch encoder gives the plain path's bytes: IPC stream and request alike."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.anvil.v1 import learner_pb2
from protos.arrow_schemas import encode_batch, make_batch
from protos.batch_encoding import encode_rows, request_bytes

DTYPES = {
    "model_input": (np.int32, np.int64),
    "target_tokens": (np.int32, np.int64),
    "logprobs": (np.float32, np.float64),
    "advantages": (np.float32,),
    "sampler_versions": (np.int64, np.int32),
}


@st.composite
def ragged_rows(draw) -> list[dict]:
    """Rows of numpy arrays of random lengths (zero included), mostly of the column's own dtype (spliced)
    and sometimes of another one (cast by the general path), with optional columns in some rows only."""
    count = draw(st.integers(1, 6))
    columns = draw(st.sets(st.sampled_from(["logprobs", "advantages", "sampler_versions"])))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = []
    for _ in range(count):
        n = draw(st.integers(0, 40))
        row = {}
        for name in ("model_input", "target_tokens", *sorted(columns)):
            dtype = draw(st.sampled_from(DTYPES[name]))
            kind = np.dtype(dtype).kind
            values = rng.integers(0, 1000, n) if kind == "i" else rng.standard_normal(n)
            row[name] = values.astype(dtype)
        if draw(st.booleans()):
            row["sampler_version"] = draw(st.integers(0, 2**40))
        rows.append(row)
    return rows


@settings(max_examples=80, deadline=None)
@given(ragged_rows())
def test_encode_rows_is_byte_identical_to_the_plain_path(rows):
    assert encode_rows(rows) == encode_batch(make_batch(rows))


@settings(max_examples=40, deadline=None)
@given(ragged_rows(), st.integers(1, 2**40), st.dictionaries(st.text(max_size=5), st.floats(allow_nan=False)))
def test_request_bytes_parse_to_the_plain_message(rows, seq_id, config):
    message = learner_pb2.ForwardBackwardRequest(session_id="s", seq_id=seq_id, loss_fn="ppo", loss_fn_config=config)
    parsed = learner_pb2.ForwardBackwardRequest.FromString(request_bytes(message, rows))
    message.batch.arrow_ipc_stream = encode_batch(make_batch(rows))
    assert parsed == message


def test_large_batch_framing_and_forward_request():
    """Lengths over 2**21 take four varint bytes; ForwardRequest frames the same way."""
    rng = np.random.default_rng(0)
    rows = [
        {
            "model_input": rng.integers(0, 50, 300_000).astype(np.int32),
            "target_tokens": np.arange(300_000, dtype=np.int32),
        }
        for _ in range(3)
    ]
    message = learner_pb2.ForwardRequest(session_id="s", seq_id=2, loss_fn="cross_entropy")
    parsed = learner_pb2.ForwardRequest.FromString(request_bytes(message, rows))
    assert parsed.batch.arrow_ipc_stream == encode_batch(make_batch(rows))
    assert parsed.session_id == "s" and parsed.seq_id == 2


def test_spliced_rows_are_read_not_kept():
    """The wire bytes are a copy: changing a row afterwards changes nothing sent."""
    row = {"model_input": np.array([1, 2, 3], dtype=np.int32), "target_tokens": np.array([2, 3, 4], dtype=np.int32)}
    encoded = encode_rows([row])
    row["model_input"][:] = 9
    assert encoded != encode_rows([row])


def test_request_with_a_batch_already_set_is_refused():
    message = learner_pb2.ForwardBackwardRequest(session_id="s", batch={"arrow_ipc_stream": b"x"})
    with pytest.raises(ValueError, match=r"leave message\.batch unset"):
        request_bytes(message, [{"model_input": [1], "target_tokens": [2]}])
