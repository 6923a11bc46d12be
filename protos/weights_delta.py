"""Lossless weight deltas, `xor-zstd`: zstd(new bytes XOR base bytes). One codec for every path that
sends weights relative to ones the receiver already holds: the stream transport's delta chunks
(WeightChunk.encoding) and service mode's sampler snapshot chain (coordinator/gateway/snapshot_store.py).

Why XOR: where an optimizer step left a float's sign, exponent and top mantissa bits alone, those bits
XOR to zero, and long zero runs compress well; it is exact (bit for bit), needs no float arithmetic and
works for any dtype. A sender uses the delta only when it is smaller than the raw piece (`encode_piece`
returns None otherwise), so a delta never costs more bytes than a raw send.
"""

from __future__ import annotations

import numpy as np
import zstandard

from protos.errors import InvalidArgument

ENCODING = "xor-zstd"
STREAM_LEVEL = 1
"""zstd level of the stream's chunks: the fastest, the sender compresses every publication."""


def _bytes_of(buffer) -> np.ndarray:
    return np.frombuffer(memoryview(buffer).cast("B"), dtype=np.uint8)


def xor_zstd_encode(new, base, level: int = STREAM_LEVEL) -> bytes:
    """zstd(new XOR base) for two buffers of the same size."""
    new_bytes, base_bytes = _bytes_of(new), _bytes_of(base)
    if new_bytes.size != base_bytes.size:
        raise ValueError(f"a delta needs buffers of one size ({new_bytes.size} vs {base_bytes.size} bytes)")
    return zstandard.ZstdCompressor(level=level).compress(np.bitwise_xor(new_bytes, base_bytes).tobytes())


def encode_piece(new, base, level: int = STREAM_LEVEL) -> bytes | None:
    """The delta of one piece, or None when it is not smaller than the raw bytes."""
    encoded = xor_zstd_encode(new, base, level)
    return encoded if len(encoded) < memoryview(new).nbytes else None


def xor_zstd_decode(blob, length: int) -> np.ndarray:
    """The XOR mask of a delta of `length` bytes; InvalidArgument when it is corrupt or the wrong size."""
    try:
        mask = zstandard.ZstdDecompressor().decompress(bytes(blob), max_output_size=max(length, 1))
    except zstandard.ZstdError as exc:
        raise InvalidArgument(f"a {ENCODING} delta is corrupt ({exc})") from None
    if len(mask) != length:
        raise InvalidArgument(f"a {ENCODING} delta holds {len(mask)} bytes where {length} were announced")
    return np.frombuffer(mask, dtype=np.uint8)


def apply_in_place(target: np.ndarray, blob, length: int) -> None:
    """Turn `target` (a uint8 array holding the base bytes) into the new bytes."""
    np.bitwise_xor(target, xor_zstd_decode(blob, length), out=target)
