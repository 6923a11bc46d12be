"""The weight-chunk codec of the stream transport, shared by the sender (learner) and receiver (rollout).

A tensor travels as raw little-endian bytes in `WeightChunk`s of at most `chunk_bytes` each, named by
its Hugging Face parameter name, with its dtype (torch's name without `torch.`) and full shape on every
chunk and the byte offset of the piece. CommitWeightUpdate verifies a named digest
(`protos.weights_digest`: `xxh3-128-tree-v1:...` from Anvil's senders, a bare sha256 from older
ones); neither depends on chunk size or send order. Nothing here imports torch: tensors are bytes.

Copies (bench/weight_sync.py measures them): the sender frames requests by hand around the tensor
bytes (`framed_push_requests`, one copy where protobuf makes two) and hashes on a worker thread while
the chunks stream; the receiver parses requests without copying the data (`parse_push_request`) and
copies each chunk once, into a preallocated tensor (`protos.weights_assembler.ChunkAssembler`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from protos.anvil.v1 import common_pb2
from protos.errors import InvalidArgument
from protos.weights_delta import ENCODING as DELTA_ENCODING
from protos.weights_delta import encode_piece
from protos.weights_digest import sha256_digest, tree_digest
from protos.wire_scan import fields, read_varint, varint
from servicekit.failpoints import failpoint

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TensorBytes:
    """A tensor as the wire sees it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def expected_bytes(dtype: str, shape: Sequence[int]) -> int:
    if dtype not in DTYPE_BYTES:
        raise InvalidArgument(f"unsupported weight dtype {dtype!r}; send one of {sorted(DTYPE_BYTES)}")
    count = 1
    for dim in shape:
        if dim < 0:
            raise InvalidArgument(f"negative dimension in shape {list(shape)}")
        count *= dim
    return count * DTYPE_BYTES[dtype]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def piece_bounds(total: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """[start, end) of a tensor's pieces: as few as `chunk_bytes` allows, of (nearly) equal size.

    Why equal and not full ones plus a remainder: a stream whose messages alternate between full size and
    small remainders took 1.26-1.36x as long through grpc as the same bytes cut this way (the synthetic
    0.5 B set, `python -m bench.stream_chunking`). Pieces are multiples of 64 bytes but the last; an empty
    tensor is one empty piece."""
    count = max(1, _ceil_div(total, chunk_bytes))
    align = 64 if chunk_bytes >= 64 else 1
    step = max(1, min(chunk_bytes, _ceil_div(_ceil_div(total, count), align) * align))
    for start in range(0, max(total, 1), step):
        yield start, min(total, start + step)


def encode_chunks(
    tensors: Iterable[TensorBytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[common_pb2.WeightChunk]:
    """Split tensors into WeightChunks of at most chunk_bytes of data each (`piece_bounds`)."""
    for tensor in tensors:
        view = memoryview(tensor.data).cast("B")
        for start, end in piece_bounds(len(view), chunk_bytes):
            data = bytes(view[start:end])
            yield common_pb2.WeightChunk(
                name=tensor.name, dtype=tensor.dtype, shape=list(tensor.shape), offset=start, data=data
            )


_PUSH_VERSION_TAG = b"\x08"  # PushWeightsRequest.version = 1, varint
_PUSH_CHUNK_TAG = b"\x12"  # PushWeightsRequest.chunk = 2, length-delimited
_CHUNK_DATA_TAG = b"\x2a"  # WeightChunk.data = 5, length-delimited


def framed_push_requests(
    version: int,
    tensors: Iterable[TensorBytes],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    base: DeltaBase | None = None,
    sent: list[int] | None = None,
    bounds: Callable[[int, int], Iterable[tuple[int, int]]] | None = None,
) -> Iterator[bytes]:
    """Serialized PushWeightsRequests of `version` for `tensors`, framed by hand around the raw bytes.

    Protobuf's Python API only takes `bytes` for a bytes field, so building a WeightChunk copies each
    piece once and serializing the request copies it again. Here the small header (name, dtype, shape,
    offset) is serialized by protobuf and the data field is appended after it with its tag and length:
    the same wire message (protobuf allows fields in any order), built with one copy of the data.
    With `base`, each piece goes as an "xor-zstd" delta from the base's bytes where that is smaller.
    `sent[0]` adds up the data bytes framed (what goes on the wire besides the small headers). `bounds`
    cuts each tensor into pieces (default `piece_bounds`; bench/stream_chunking.py compares another).
    """
    version_field = _PUSH_VERSION_TAG + varint(version) if version else b""
    for tensor in tensors:
        view, shape = memoryview(tensor.data).cast("B"), list(tensor.shape)
        for offset, end in (bounds or piece_bounds)(len(view), chunk_bytes):
            piece = view[offset:end]
            header = common_pb2.WeightChunk(name=tensor.name, dtype=tensor.dtype, shape=shape, offset=offset)
            delta = base.encode(tensor.name, offset, piece) if base is not None else None
            if delta is not None:
                header.encoding, header.base_version, header.length = DELTA_ENCODING, base.version, len(piece)
                piece = delta
            header = header.SerializeToString()
            if sent is not None:
                sent[0] += len(piece)
            data_field = _CHUNK_DATA_TAG + varint(len(piece)) if len(piece) else b""
            chunk_length = len(header) + len(data_field) + len(piece)
            yield b"".join((version_field, _PUSH_CHUNK_TAG, varint(chunk_length), header, data_field, piece))
            failpoint("weights.push_chunk")


@dataclass(frozen=True)
class DeltaBase:
    """The bytes of weight version `version` a receiver holds: pieces are sent as deltas from them."""

    version: int
    tensors: Mapping[str, TensorBytes]
    digest: str
    """Of `tensors` (weights_digest.tree_digest): a receiver's base must have been verified against it."""

    def held_by(self, opened) -> bool:
        """Whether a replica's BeginWeightUpdateResponse says it holds exactly these bytes."""
        return opened.delta_base == self.version and opened.delta_base_digest == self.digest

    def encode(self, name: str, offset: int, piece: memoryview) -> bytes | None:
        """The piece as a delta from the base's same bytes, or None where raw is smaller or no base exists."""
        held = self.tensors.get(name)
        if held is None or memoryview(held.data).nbytes < offset + len(piece):
            return None
        return encode_piece(piece, memoryview(held.data).cast("B")[offset : offset + len(piece)])


def digest(tensors: Mapping[str, bytes | memoryview] | Iterable[tuple[str, bytes | memoryview]]) -> str:
    """The original sha256 digest format (kept: snapshots are named by it, and receivers still accept it)."""
    return sha256_digest(tensors)


@dataclass(frozen=True)
class RawChunk:
    """A WeightChunk whose data is a view into the received message: nothing copied yet."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    data: memoryview
    encoding: str = ""
    base_version: int = 0
    length: int = 0


@dataclass(frozen=True)
class RawPush:
    """A PushWeightsRequest as `parse_push_request` returns it (same attributes as the protobuf)."""

    version: int
    chunk: RawChunk
    raw: bytes = b""
    """The whole wire message, as received (a relay forwards it as is)."""


def parse_push_request(message: bytes) -> RawPush:
    """The PushWeights request deserializer: the chunk's data stays a view into `message` (zero copy).

    protobuf's parser copies a bytes field into the message, and every read of `chunk.data` copies it
    again; at 1 GB a publication those copies cost more than the wire. Here only the small header fields
    go through protobuf (the data field cut out), and the receiver copies the data once, into its
    preallocated tensor. Fields may come in any order, as protobuf allows; the last `data` wins.
    """
    view = memoryview(message).cast("B")
    version, chunk_view = 0, memoryview(b"")
    for number, wire, _, start, end in fields(view, "PushWeightsRequest"):
        if number == 1 and wire == 0:
            version = read_varint(view, start)[0]
        elif number == 2 and wire == 2:
            chunk_view = view[start:end]
    header, data = bytearray(), memoryview(b"")
    for number, wire, key_start, start, end in fields(chunk_view, "PushWeightsRequest"):
        if number == 5 and wire == 2:
            data = chunk_view[start:end]
        else:
            header += chunk_view[key_start:end]
    parsed = common_pb2.WeightChunk.FromString(bytes(header))
    chunk = RawChunk(
        parsed.name,
        parsed.dtype,
        tuple(parsed.shape),
        parsed.offset,
        data,
        parsed.encoding,
        parsed.base_version,
        parsed.length,
    )
    return RawPush(version, chunk, message)


async def push_weight_update(
    channel,
    version: int,
    tensors: list[TensorBytes],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    known_digest: str | None = None,
    base: DeltaBase | None = None,
    rewind: bool = False,
) -> int:
    """Run Begin -> Push -> Commit against one RolloutService; return the bytes sent (`rewind`: the
    replica takes `version` even if it serves a newer one).

    The digest (`xxh3-128-tree-v1`) is computed from the same bytes that are sent, so the receiver
    verifies end to end; it is computed in a worker thread while the chunks stream (xxhash releases the
    GIL), or taken from `known_digest` when the caller has it. With `base` (bytes the sender published
    before), pieces go as lossless deltas from it when the replica holds that version and a delta is
    smaller. Tensors go in name order (the receiver does not need it; it keeps runs reproducible).
    On any failure the update is aborted (best effort) and the error propagates.
    """
    from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc

    ordered = sorted(tensors, key=lambda tensor: tensor.name)
    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
    push_framed = channel.stream_unary(
        f"/{rollout_pb2.DESCRIPTOR.services_by_name['RolloutService'].full_name}/PushWeights",
        request_serializer=None,  # the requests are already wire bytes
        response_deserializer=rollout_pb2.PushWeightsResponse.FromString,
    )
    opened = await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=version, rewind=rewind))
    if base is not None and not base.held_by(opened):
        base = None  # the replica does not hold those bytes: raw
    hashing = asyncio.ensure_future(
        asyncio.to_thread(tree_digest, [(t.name, t.dtype, t.shape, t.data) for t in ordered])
        if known_digest is None
        else _ready(known_digest)
    )
    try:
        sent = [0]
        await push_framed(framed_push_requests(version, ordered, chunk_bytes, base, sent))
        expected = await hashing
        await stub.CommitWeightUpdate(rollout_pb2.CommitWeightUpdateRequest(version=version, digest=expected))
    except BaseException:
        hashing.cancel()
        with contextlib.suppress(Exception):
            await stub.AbortWeightUpdate(rollout_pb2.AbortWeightUpdateRequest(version=version))
        raise
    return sent[0]


async def _ready(value: str) -> str:
    return value
