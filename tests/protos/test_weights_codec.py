"""The weight-chunk codec: hand-framed requests are the protobuf message, and the receiver's running
digest equals `digest()` whatever order the chunks arrive in."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from protos.anvil.v1 import rollout_pb2
from protos.errors import InvalidArgument
from protos.weights_assembler import ChunkAssembler
from protos.weights_codec import TensorBytes, digest, encode_chunks, framed_push_requests, piece_bounds

SHAPES = {"b.weight": (3, 5), "a.bias": (7,), "empty": (0, 4), "c.weight": (64, 33)}


def tensors(seed: int = 0) -> list[TensorBytes]:
    rng = np.random.default_rng(seed)
    return [
        TensorBytes(name, "float32", shape, rng.standard_normal(shape, dtype=np.float32).tobytes())
        for name, shape in SHAPES.items()
    ]


@pytest.mark.parametrize("version", [0, 1, 300, 2**40])
@pytest.mark.parametrize("chunk_bytes", [1, 100, 4096, 1 << 20])
def test_framed_requests_are_the_protobuf_messages(version, chunk_bytes):
    framed = list(framed_push_requests(version, tensors(), chunk_bytes))
    expected = [
        rollout_pb2.PushWeightsRequest(version=version, chunk=chunk) for chunk in encode_chunks(tensors(), chunk_bytes)
    ]
    assert [rollout_pb2.PushWeightsRequest.FromString(wire) for wire in framed] == expected
    assert framed == [message.SerializeToString() for message in expected]


@pytest.mark.parametrize(
    ("total", "chunk_bytes"),
    [(0, 64), (1, 64), (4 << 20, 4 << 20), ((4 << 20) + 1, 4 << 20), (8_716_288, 4 << 20), (272_269_312, 4 << 20)],
)
def test_pieces_cover_the_tensor_in_as_few_nearly_equal_pieces_as_the_chunk_size_allows(total, chunk_bytes):
    pieces = list(piece_bounds(total, chunk_bytes))
    assert pieces[0][0] == 0 and pieces[-1][1] == total
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(pieces)), "contiguous"
    sizes = [end - start for start, end in pieces]
    assert len(pieces) == max(1, -(-total // chunk_bytes)), "no more pieces than full ones would take"
    assert max(sizes) <= chunk_bytes
    assert max(sizes) - min(sizes) <= 64 * len(pieces), "no small remainder after full pieces"
    assert all(size % 64 == 0 for size in sizes[:-1])


@pytest.mark.parametrize("order", ["in_order", "reversed", "shuffled"])
def test_running_digest_matches_whatever_the_arrival_order(order):
    sent = tensors(seed=1)
    chunks = list(encode_chunks(sorted(sent, key=lambda t: t.name), chunk_bytes=64))
    if order == "reversed":
        chunks.reverse()
    elif order == "shuffled":
        random.Random(0).shuffle(chunks)
    assembler = ChunkAssembler(SHAPES)
    for chunk in chunks:
        assembler.add(chunk)
    expected = digest({t.name: t.data for t in sent})
    staged = assembler.finish(expected)
    assert {name: bytes(t.data) for name, t in staged.items()} == {t.name: bytes(t.data) for t in sent}


def test_running_digest_rejects_changed_bytes():
    sent = tensors(seed=2)
    assembler = ChunkAssembler(SHAPES)
    for chunk in encode_chunks(sent, chunk_bytes=64):
        assembler.add(chunk)
    with pytest.raises(InvalidArgument, match="digest mismatch"):
        assembler.finish(digest({t.name: t.data for t in tensors(seed=3)}))
