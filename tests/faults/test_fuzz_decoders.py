"""Property tests (hypothesis) of what every server decodes from the wire: Arrow batch payloads and
weight chunks. Whatever arrives - random bytes, a valid payload with bytes flipped, rows with any token
ids, chunks with any names, shapes, dtypes, offsets, encodings - the decoder either accepts it (and then
the result is consistent with the input) or raises InvalidArgument with a message. Nothing else escapes:
an escaping exception is what a server would turn into INTERNAL."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learner.batch import batch_from_arrow
from protos.anvil.v1 import common_pb2
from protos.arrow_schemas import encode_batch, make_batch
from protos.errors import InvalidArgument
from protos.weights_assembler import ChunkAssembler
from protos.weights_codec import expected_bytes

VOCAB = 64
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tokens = st.lists(st.integers(min_value=-5, max_value=VOCAB + 5), min_size=0, max_size=12)
floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@st.composite
def rows(draw) -> list[dict]:
    """Rows that may or may not be valid: token ids around the vocabulary's edges, mismatched lengths."""
    count = draw(st.integers(min_value=0, max_value=4))
    out = []
    for _ in range(count):
        model_input = draw(tokens)
        targets = draw(st.one_of(st.just([t % VOCAB for t in model_input]), tokens))
        weights = draw(st.one_of(st.just([1.0] * len(targets)), st.lists(floats, max_size=12)))
        out.append({"model_input": model_input, "target_tokens": targets, "weights": weights})
    return out


def valid_payload() -> bytes:
    rows_ = [{"model_input": [1, 2, 3], "target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 0.5]}] * 2
    return encode_batch(make_batch(rows_))


def decode_or_refuse(payload: bytes):
    try:
        return batch_from_arrow(payload, vocab_size=VOCAB)
    except InvalidArgument as exc:
        assert str(exc), "a refusal says what is wrong"
        return None


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_as_invalid_argument(payload):
    decode_or_refuse(payload)


@FUZZ
@given(st.data())
def test_a_valid_payload_with_bytes_flipped_is_decoded_or_refused(data):
    payload = bytearray(valid_payload())
    for _ in range(data.draw(st.integers(min_value=1, max_value=8))):
        at = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[at] = data.draw(st.integers(min_value=0, max_value=255))
    batch = decode_or_refuse(bytes(payload))
    if batch is not None:
        for datum in batch.data:
            assert ((datum.model_input >= 0) & (datum.model_input < VOCAB)).all()
            assert ((datum.target_tokens >= 0) & (datum.target_tokens < VOCAB)).all()


@FUZZ
@given(rows())
def test_rows_with_any_tokens_are_accepted_only_when_valid(given_rows):
    try:
        payload = encode_batch(make_batch(given_rows))
    except (InvalidArgument, ValueError, TypeError):
        return  # the client-side encoder refused them: nothing reaches a server
    batch = decode_or_refuse(payload)
    if batch is not None:
        assert len(batch.data) == len(given_rows)
        for datum, row in zip(batch.data, given_rows, strict=True):
            assert datum.model_input.tolist() == row["model_input"]
            assert all(0 <= t < VOCAB for t in row["model_input"] + row["target_tokens"])
            assert len(row["target_tokens"]) == len(row["model_input"])


SERVED = {"a.weight": (4, 3), "b.bias": (5,)}


@st.composite
def chunks(draw) -> list[common_pb2.WeightChunk]:
    out = []
    for _ in range(draw(st.integers(min_value=0, max_value=6))):
        name = draw(st.sampled_from([*SERVED, "c.unknown", ""]))
        shape = draw(st.one_of(st.just(list(SERVED.get(name, (2,)))), st.lists(st.integers(-1, 6), max_size=3)))
        dtype = draw(st.sampled_from(["float32", "bfloat16", "int8", ""]))
        out.append(
            common_pb2.WeightChunk(
                name=name,
                shape=shape,
                dtype=dtype,
                offset=draw(st.integers(min_value=-4, max_value=64)),
                data=draw(st.binary(max_size=64)),
                encoding=draw(st.sampled_from(["", "", "xor-zstd", "gzip"])),
                base_version=draw(st.integers(min_value=0, max_value=2)),
                length=draw(st.integers(min_value=0, max_value=64)),
            )
        )
    return out


@FUZZ
@given(chunks(), st.booleans())
def test_any_chunk_stream_is_assembled_or_refused(stream, with_base):
    spare = {n: np.zeros(expected_bytes("float32", s), np.uint8) for n, s in SERVED.items()} if with_base else None
    assembler = ChunkAssembler(SERVED, spare, spare_version=1 if with_base else 0)
    try:
        for chunk in stream:
            assembler.add(chunk)
        tensors = assembler.finish()
    except InvalidArgument as exc:
        assert str(exc)
        return
    assert set(tensors) == set(SERVED)
    for name, tensor in tensors.items():
        assert tuple(tensor.shape) == SERVED[name]
        assert len(memoryview(tensor.data).cast("B")) == expected_bytes(tensor.dtype, SERVED[name])
