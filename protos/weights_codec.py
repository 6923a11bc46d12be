"""The weight-chunk codec of the stream transport, shared by the sender (learner) and receiver (rollout).

A tensor travels as raw little-endian bytes in `WeightChunk`s of at most `chunk_bytes` each, named by
its Hugging Face parameter name, with its dtype (torch's name without `torch.`) and full shape on every
chunk and the byte offset of the piece. The digest CommitWeightUpdate verifies is

    sha256( for name in sorted(names): utf8(name) + b"\\0" + tensor_bytes(name) )

so it does not depend on chunk size or send order. Nothing here imports torch: tensors are bytes.
"""

from __future__ import annotations

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

    @property
    def complete(self) -> bool:
        covered = 0
        for start, end in sorted(self.received):
            if start > covered:
                return False
            covered = max(covered, end)
        return covered == len(self.buffer)


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

    def add(self, chunk: common_pb2.WeightChunk) -> None:
        name, shape = chunk.name, tuple(chunk.shape)
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
        start, end = chunk.offset, chunk.offset + len(chunk.data)
        if start < 0 or end > size:
            raise InvalidArgument(f"chunk of {name!r} covers bytes [{start}, {end}) outside the tensor's {size} bytes")
        if any(start < seen_end and seen_start < end for seen_start, seen_end in staged.received):
            raise InvalidArgument(f"chunk of {name!r} at offset {start} overlaps bytes already received")
        staged.buffer[start:end] = chunk.data
        staged.received.append((start, end))
        self.num_chunks += 1
        self.num_bytes += len(chunk.data)

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
            actual = digest({name: tensor.data for name, tensor in tensors.items()})
            if actual != expected_digest:
                raise InvalidArgument(f"digest mismatch: the staged weights hash to {actual}, not {expected_digest}")
        return tensors


async def push_weight_update(
    channel, version: int, tensors: list[TensorBytes], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> int:
    """Run Begin -> Push -> Commit against one RolloutService; return the bytes sent.

    The digest is computed from the same bytes that are sent, so the receiver verifies end to end.
    On any failure the update is aborted (best effort) and the error propagates.
    """
    from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc

    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
    await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=version))
    try:
        requests = (
            rollout_pb2.PushWeightsRequest(version=version, chunk=chunk)
            for chunk in encode_chunks(tensors, chunk_bytes)
        )
        pushed = await stub.PushWeights(requests)
        await stub.CommitWeightUpdate(
            rollout_pb2.CommitWeightUpdateRequest(version=version, digest=digest({t.name: t.data for t in tensors}))
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await stub.AbortWeightUpdate(rollout_pb2.AbortWeightUpdateRequest(version=version))
        raise
    return pushed.num_bytes
