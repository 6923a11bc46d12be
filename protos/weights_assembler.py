"""The receiving half of the stream transport: chunks copied once into preallocated tensors, checked as
they arrive, hashed as each tensor completes.

Why it looks like this (bench/weight_sync.py measures it): on the reference VM, touching fresh memory
costs more than the wire (a first write into 1 GB of new pages takes ~2 s, a copy into warm pages
~0.1 s), and protobuf's parser copies every chunk twice more. So each chunk arrives as a view into the
gRPC message (`weights_codec.parse_push_request`) and is copied exactly once, into a per-parameter
buffer sized from the served shape; the buffers are handed back after the update (`spare_buffers`) and
reused by the next one, so steady-state updates never fault in new pages. Each tensor is hashed
(`weights_digest.tensor_hash`, xxh3 releases the GIL) on a worker thread the moment its last byte
lands, overlapping the rest of the transfer, in whatever order chunks arrive.

A lossless delta ("xor-zstd" chunks, protos/weights_delta.py) applies in place: the reused buffers hold
the last committed version's bytes (`spare_version`), and a chunk's XOR mask turns its piece of them into
the new bytes. A delta from any other version, or onto a buffer that does not hold the base, is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from protos.errors import InvalidArgument
from protos.weights_codec import TensorBytes, expected_bytes
from protos.weights_delta import ENCODING, apply_in_place
from protos.weights_digest import combine_tree, sha256_digest, tensor_hash, tree_record, verify

_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weights-digest")
"""One thread: the receiving event loop keeps the other core; tensors are hashed one after another."""


@dataclass
class _Staged:
    dtype: str
    buffer: np.ndarray
    holds_base: bool
    """The buffer held the base version's bytes of this tensor when staging began (delta chunks apply)."""
    received: list[tuple[int, int]] = field(default_factory=list)
    received_bytes: int = 0
    hashed: Future[bytes] | None = None

    @property
    def complete(self) -> bool:
        # Pieces never overlap and lie inside the buffer, so their lengths add up to its size exactly
        # when every byte has arrived.
        return self.received_bytes == self.buffer.nbytes


class ChunkAssembler:
    """Reassembles a stream of WeightChunks into whole tensors, rejecting anything inconsistent.

    `expected` maps each parameter name the receiver serves to its shape: unknown names and wrong
    shapes are rejected as they arrive, overlapping or out-of-range pieces too, and `finish` demands
    that every expected parameter arrived complete and that the digest matches. `spare` holds buffers of
    an earlier update to write into (taken over; a size mismatch allocates anew).
    """

    def __init__(
        self,
        expected: Mapping[str, tuple[int, ...]],
        spare: dict[str, np.ndarray] | None = None,
        spare_version: int = 0,
    ) -> None:
        self._expected = expected
        self._spare = spare if spare is not None else {}
        self.base_version = spare_version
        """The weight version whose bytes `spare` holds (0: none): what "xor-zstd" chunks may apply to."""
        self._staged: dict[str, _Staged] = {}
        self.num_chunks = 0
        self.num_bytes = 0

    def add(self, chunk) -> None:
        """Copy one chunk (a protobuf WeightChunk or a `weights_codec.RawChunk`) into its tensor."""
        name, shape = chunk.name, tuple(chunk.shape)
        data = chunk.data  # a protobuf bytes field copies on every read: read it once
        if name not in self._expected:
            raise InvalidArgument(f"unknown parameter {name!r}: the served model has no such weight")
        if shape != tuple(self._expected[name]):
            raise InvalidArgument(
                f"parameter {name!r} has shape {list(shape)} but the served model expects {list(self._expected[name])}"
            )
        size = expected_bytes(chunk.dtype, shape)
        staged = self._staged.get(name)
        if staged is None:
            staged = self._staged[name] = _Staged(chunk.dtype, *self._buffer(name, size))
        elif staged.dtype != chunk.dtype:
            raise InvalidArgument(f"parameter {name!r} changed dtype mid-stream ({staged.dtype} -> {chunk.dtype})")
        delta = getattr(chunk, "encoding", "") == ENCODING
        if not delta and getattr(chunk, "encoding", ""):
            raise InvalidArgument(f"chunk of {name!r} has encoding {chunk.encoding!r}; send raw or {ENCODING!r}")
        start = chunk.offset
        end = start + (chunk.length if delta else len(data))
        if start < 0 or end > size:
            raise InvalidArgument(f"chunk of {name!r} covers bytes [{start}, {end}) outside the tensor's {size} bytes")
        if any(start < seen_end and seen_start < end for seen_start, seen_end in staged.received):
            raise InvalidArgument(f"chunk of {name!r} at offset {start} overlaps bytes already received")
        if delta:
            if not self.base_version or chunk.base_version != self.base_version or not staged.holds_base:
                raise InvalidArgument(
                    f"chunk of {name!r} is a delta from version {chunk.base_version}, but this replica holds the "
                    f"bytes of version {self.base_version or 'none'}; send it raw"
                )
            apply_in_place(staged.buffer[start:end], data, end - start)
        elif end > start:
            staged.buffer.data[start:end] = data
        staged.received.append((start, end))
        staged.received_bytes += end - start
        self.num_chunks += 1
        self.num_bytes += end - start
        if staged.complete:
            staged.hashed = _HASHER.submit(tensor_hash, staged.buffer.data)

    def _buffer(self, name: str, size: int) -> tuple[np.ndarray, bool]:
        """A staging buffer for `name`, and whether it holds the base version's bytes of it."""
        buffer = self._spare.pop(name, None)
        if buffer is not None and buffer.nbytes == size:
            return buffer, bool(self.base_version)
        return np.empty(size, dtype=np.uint8), False

    def spare_buffers(self) -> dict[str, np.ndarray]:
        """Every staging buffer (and the unused spares), for the next update to write into.

        Only call this once the tensors `finish` returned are no longer read (the engine copied them).
        """
        return {**self._spare, **{name: staged.buffer for name, staged in self._staged.items()}}

    def finish(self, expected_digest: str = "") -> dict[str, TensorBytes]:
        """Every expected tensor, complete and matching the digest (when one is given), or InvalidArgument."""
        missing = sorted(set(self._expected) - set(self._staged))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise InvalidArgument(f"{len(missing)} parameter(s) never arrived: {shown}; push the full set of weights")
        incomplete = sorted(name for name, staged in self._staged.items() if not staged.complete)
        if incomplete:
            raise InvalidArgument(f"parameter(s) arrived incomplete (bytes missing): {', '.join(incomplete[:5])}")
        shapes = {name: tuple(self._expected[name]) for name in self._staged}
        tensors = {
            name: TensorBytes(name, staged.dtype, shapes[name], staged.buffer) for name, staged in self._staged.items()
        }
        if expected_digest:
            verify(
                expected_digest,
                tree=lambda: combine_tree(
                    {
                        name: tree_record(name, staged.dtype, shapes[name], staged.hashed.result())
                        for name, staged in self._staged.items()
                        if staged.hashed is not None
                    }
                ),
                sha256=lambda: sha256_digest({name: staged.buffer.data for name, staged in self._staged.items()}),
            )
        return tensors
