"""The weight-chunk codec of the stream transport, shared by the sender (learner) and receiver (rollout).

A tensor travels as raw little-endian bytes in `WeightChunk`s of at most `chunk_bytes` each, named by
its Hugging Face parameter name, with its dtype (torch's name without `torch.`) and full shape on every
chunk and the byte offset of the piece. The digest CommitWeightUpdate verifies is

    sha256( for name in sorted(names): utf8(name) + b"\\0" + tensor_bytes(name) )

so it does not depend on chunk size or send order. Nothing here imports torch: tensors are bytes.

Speed (bench/weight_sync.py measures it): sha256 runs at ~1.3 GB/s a core on the reference machine,
slower than the gRPC stream itself, so neither side makes a separate pass over the weights for it.
The sender sends tensors in name order and hashes in a worker thread while the chunks stream; the
receiver (`ChunkAssembler`) hashes each piece as soon as everything before it in name order has
arrived, so with an in-order stream the digest is ready when the last chunk lands. Requests are framed
by hand around the tensor bytes (`framed_push_requests`), one copy instead of protobuf's two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from protos.anvil.v1 import common_pb2
from protos.errors import InvalidArgument

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


def encode_chunks(
    tensors: Iterable[TensorBytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[common_pb2.WeightChunk]:
    """Split tensors into WeightChunks of at most chunk_bytes of data each."""
    for tensor in tensors:
        view = memoryview(tensor.data).cast("B")
        total = len(view)
        offset = 0
        while True:
            piece = view[offset : offset + chunk_bytes]
            yield common_pb2.WeightChunk(
                name=tensor.name, dtype=tensor.dtype, shape=list(tensor.shape), offset=offset, data=bytes(piece)
            )
            offset += len(piece)
            if offset >= total:
                break


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


_PUSH_VERSION_TAG = b"\x08"  # PushWeightsRequest.version = 1, varint
_PUSH_CHUNK_TAG = b"\x12"  # PushWeightsRequest.chunk = 2, length-delimited
_CHUNK_DATA_TAG = b"\x2a"  # WeightChunk.data = 5, length-delimited


def framed_push_requests(
    version: int, tensors: Iterable[TensorBytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Serialized PushWeightsRequests of `version` for `tensors`, framed by hand around the raw bytes.

    Protobuf's Python API only takes `bytes` for a bytes field, so building a WeightChunk copies each
    piece once and serializing the request copies it again. Here the small header (name, dtype, shape,
    offset) is serialized by protobuf and the data field is appended after it with its tag and length:
    the same wire message (protobuf allows fields in any order), built with one copy of the data.
    """
    version_field = _PUSH_VERSION_TAG + _varint(version) if version else b""
    for tensor in tensors:
        view = memoryview(tensor.data).cast("B")
        total, offset, shape = len(view), 0, list(tensor.shape)
        while True:
            piece = view[offset : offset + chunk_bytes]
            header = common_pb2.WeightChunk(
                name=tensor.name, dtype=tensor.dtype, shape=shape, offset=offset
            ).SerializeToString()
            data_field = _CHUNK_DATA_TAG + _varint(len(piece)) if len(piece) else b""
            chunk_length = len(header) + len(data_field) + len(piece)
            yield b"".join((version_field, _PUSH_CHUNK_TAG, _varint(chunk_length), header, data_field, piece))
            offset += len(piece)
            if offset >= total:
                break


def digest(tensors: Mapping[str, bytes | memoryview] | Iterable[tuple[str, bytes | memoryview]]) -> str:
    """Hex sha256 of name-sorted (name, NUL, bytes) records: the CommitWeightUpdate digest."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    hasher = hashlib.sha256()
    for name, data in sorted(items, key=lambda item: item[0]):
        hasher.update(name.encode())
        hasher.update(b"\0")
        hasher.update(data)
    return hasher.hexdigest()


@dataclass
class _Staged:
    dtype: str
    shape: tuple[int, ...]
    buffer: bytearray
    received: list[tuple[int, int]] = field(default_factory=list)

    def covered_prefix(self) -> int:
        """How many bytes from offset 0 have arrived without a gap."""
        covered = 0
        for start, end in sorted(self.received):
            if start > covered:
                break
            covered = max(covered, end)
        return covered

    @property
    def complete(self) -> bool:
        return self.covered_prefix() == len(self.buffer)


class ChunkAssembler:
    """Reassembles a stream of WeightChunks into whole tensors, rejecting anything inconsistent.

    `expected` maps each parameter name the receiver serves to its shape: unknown names and wrong
    shapes are rejected as they arrive, overlapping or out-of-range pieces too, and `finish` demands
    that every expected parameter arrived complete.
    """

    def __init__(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        self._expected = expected
        self._staged: dict[str, _Staged] = {}
        self.num_chunks = 0
        self.num_bytes = 0
        self._hasher = hashlib.sha256()
        self._hash_order = sorted(expected)
        self._hash_cursor = 0
        """Index in `_hash_order` of the tensor being hashed; every tensor before it is in the digest."""
        self._hashed_bytes = 0
        """Bytes of the cursor's tensor already in the digest."""
        self._name_hashed = False
        """Whether the cursor's name record (name, NUL) is in the digest."""

    def add(self, chunk: common_pb2.WeightChunk) -> None:
        name, shape = chunk.name, tuple(chunk.shape)
        data = chunk.data  # each read of a bytes field makes a new bytes object: read it once
        if name not in self._expected:
            raise InvalidArgument(f"unknown parameter {name!r}: the served model has no such weight")
        if shape != tuple(self._expected[name]):
            raise InvalidArgument(
                f"parameter {name!r} has shape {list(shape)} but the served model expects {list(self._expected[name])}"
            )
        size = expected_bytes(chunk.dtype, shape)
        staged = self._staged.get(name)
        if staged is None:
            staged = self._staged[name] = _Staged(chunk.dtype, shape, bytearray(size))
        elif staged.dtype != chunk.dtype:
            raise InvalidArgument(f"parameter {name!r} changed dtype mid-stream ({staged.dtype} -> {chunk.dtype})")
        start, end = chunk.offset, chunk.offset + len(data)
        if start < 0 or end > size:
            raise InvalidArgument(f"chunk of {name!r} covers bytes [{start}, {end}) outside the tensor's {size} bytes")
        if any(start < seen_end and seen_start < end for seen_start, seen_end in staged.received):
            raise InvalidArgument(f"chunk of {name!r} at offset {start} overlaps bytes already received")
        staged.buffer[start:end] = data
        staged.received.append((start, end))
        self.num_chunks += 1
        self.num_bytes += len(data)
        self._advance_digest()

    def _advance_digest(self) -> None:
        """Hash every byte that is next in digest order and has arrived (in-order streams: this chunk)."""
        while self._hash_cursor < len(self._hash_order):
            staged = self._staged.get(self._hash_order[self._hash_cursor])
            if staged is None:
                return
            if not self._name_hashed:
                self._hasher.update(self._hash_order[self._hash_cursor].encode())
                self._hasher.update(b"\0")
                self._name_hashed = True
            covered = staged.covered_prefix()
            if covered > self._hashed_bytes:
                self._hasher.update(memoryview(staged.buffer)[self._hashed_bytes : covered])
                self._hashed_bytes = covered
            if covered < len(staged.buffer):
                return
            self._hash_cursor, self._hashed_bytes, self._name_hashed = self._hash_cursor + 1, 0, False

    def finish(self, expected_digest: str = "") -> dict[str, TensorBytes]:
        """Every expected tensor, complete and matching the digest (when one is given), or InvalidArgument."""
        missing = sorted(set(self._expected) - set(self._staged))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InvalidArgument(f"{len(missing)} parameter(s) never arrived: {shown}; push the full set of weights")
        incomplete = sorted(name for name, staged in self._staged.items() if not staged.complete)
        if incomplete:
            raise InvalidArgument(f"parameter(s) arrived incomplete (bytes missing): {', '.join(incomplete[:5])}")
        tensors = {
            name: TensorBytes(name, staged.dtype, staged.shape, staged.buffer) for name, staged in self._staged.items()
        }
        if expected_digest:
            # Every expected tensor is complete, so the running digest has taken in all of them, in order.
            assert self._hash_cursor == len(self._hash_order), "running digest fell behind a complete set"
            actual = self._hasher.hexdigest()
            if actual != expected_digest:
                raise InvalidArgument(f"digest mismatch: the staged weights hash to {actual}, not {expected_digest}")
        return tensors


async def push_weight_update(
    channel, version: int, tensors: list[TensorBytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Run Begin -> Push -> Commit against one RolloutService; return the bytes sent.

    The digest is computed from the same bytes that are sent, so the receiver verifies end to end; it is
    computed in a worker thread while the chunks stream (hashlib releases the GIL), and tensors go in
    name order so the receiver's running digest keeps up with the stream.
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
    await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=version))
    hashing = asyncio.ensure_future(asyncio.to_thread(digest, [(t.name, t.data) for t in ordered]))
    try:
        pushed = await push_framed(framed_push_requests(version, ordered, chunk_bytes))
        expected = await hashing
        await stub.CommitWeightUpdate(rollout_pb2.CommitWeightUpdateRequest(version=version, digest=expected))
    except BaseException:
        hashing.cancel()
        with contextlib.suppress(Exception):
            await stub.AbortWeightUpdate(rollout_pb2.AbortWeightUpdateRequest(version=version))
        raise
    return pushed.num_bytes
