"""The shared-memory segment of the `shm` transport (format `anvil-shm-v1`): written once by the learner,
mapped by every replica on the host.

    b"ANVILSHM" | header length (8 bytes, little-endian) | JSON header, space-padded | tensor bytes

The header is `{"format", "version", "digest", "tensors": [{"name", "dtype", "shape", "offset",
"nbytes"}]}`; each tensor's raw little-endian bytes start at its `offset`, 64-byte aligned. `digest` is
the `xxh3-128-tree-v1` digest (protos.weights_digest) the learner computed from its own tensors, not
from the segment, so a replica that hashes what it mapped verifies the weights end to end.

Why a file in /dev/shm and not a gRPC stream: on one host the bytes need not cross a socket at all;
the learner copies them once, and a replica reads them in place (numpy views over the mapping, no copy
until the engine's own swap copies them into its parameters).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from protos.errors import InvalidArgument, NotFound
from protos.weights_codec import TensorBytes, expected_bytes
from protos.weights_digest import combine_tree, tensor_hash, tree_record, verify

MAGIC = b"ANVILSHM"
FORMAT = "anvil-shm-v1"
ALIGN = 64
SEGMENT_PREFIX = "anvil-weights-"
"""Every segment's file name starts with this (tests and sweeps find them by it)."""


@dataclass(frozen=True)
class Layout:
    header: bytes
    offsets: list[int]
    total: int


def layout(version: int, tensors: Sequence[TensorBytes], digest: str) -> Layout:
    """Where each tensor goes; `digest` may be a same-length placeholder until the real one is known."""
    entries = [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": memoryview(t.data).nbytes} for t in tensors
    ]
    body = {"format": FORMAT, "version": version, "digest": digest, "tensors": entries}
    sized = json.dumps({**body, "tensors": [{**e, "offset": 10**15} for e in entries]}).encode()
    start = -(-(16 + len(sized)) // ALIGN) * ALIGN
    offsets, at = [], start
    for entry in entries:
        entry["offset"] = at
        offsets.append(at)
        at += -(-entry["nbytes"] // ALIGN) * ALIGN
    header = json.dumps(body).encode().ljust(start - 16)
    return Layout(MAGIC + (start - 16).to_bytes(8, "little") + header, offsets, max(at, start))


BLOCK = 1 << 20
"""Copy-then-hash unit of `write_into`: small enough that the hash reads the block from cache."""


def write_into(target: mmap.mmap, plan: Layout, tensors: Sequence[TensorBytes], threads: int = 2) -> dict[str, bytes]:
    """Write the segment `plan` lays out into the writable mapping `target` (at least `plan.total` long);
    return each tensor's `tensor_hash`.

    Each 1 MiB block is copied and then hashed from the source while it is still in cache, so the hash
    costs little memory traffic of its own; tensors are shared out over `threads` (numpy's copy and xxh3
    release the GIL). The hashes are of the learner's own bytes, not of the segment, so a replica that
    hashes what it mapped checks the copy too."""
    view = np.frombuffer(target, dtype=np.uint8)
    view[: len(plan.header)] = np.frombuffer(plan.header, dtype=np.uint8)

    def copy_and_hash(tensor: TensorBytes, offset: int) -> bytes:
        source = np.frombuffer(tensor.data, dtype=np.uint8)
        hasher = xxhash.xxh3_128()
        for start in range(0, source.nbytes, BLOCK):
            block = source[start : start + BLOCK]
            view[offset + start : offset + start + block.nbytes] = block
            hasher.update(block)
        return hasher.digest()

    with ThreadPoolExecutor(threads, thread_name_prefix="shm-write") as pool:
        hashes = pool.map(copy_and_hash, tensors, plan.offsets)
        return {tensor.name: hashed for tensor, hashed in zip(tensors, hashes, strict=True)}


class _WarmMapping:
    """The last segment file a replica mapped, kept mapped: a learner writes each publication into the
    same file (learner.transports.shm), so the next load finds its pages already in this process's page
    tables instead of taking one fault per 4 KiB page (~0.25 s per GB on the reference VM).

    Keyed by (device, inode, size): a file replaced or resized is mapped afresh. The mapping is read-only
    and shared, so it always shows what the learner wrote last; a load copies out of it before it
    answers, and the learner writes again only after every replica answered. The cost: the last file's
    pages stay alive until the next load maps another, or the process ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[int, int, int] | None = None
        self._map: mmap.mmap | None = None

    def get(self, path: Path) -> mmap.mmap:
        try:
            with open(path, "rb") as file:
                stat = os.fstat(file.fileno())
                key = (stat.st_dev, stat.st_ino, stat.st_size)
                with self._lock:
                    if key != self._key or self._map is None:
                        if stat.st_size == 0:
                            raise InvalidArgument(f"{path} is not an {FORMAT} segment (empty)")
                        self._drop()
                        self._map = mmap.mmap(
                            file.fileno(),
                            0,
                            flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                            prot=mmap.PROT_READ,
                        )
                        self._key = key
                    return self._map
        except FileNotFoundError:
            raise NotFound(f"no shared-memory segment at {path}: the learner is on another host") from None

    def _drop(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # views still alive keep it until they are collected
                self._map.close()
        self._map, self._key = None, None


_WARM = _WarmMapping()


class MappedSegment:
    """A segment opened by a replica: its version, digest and tensors as zero-copy, read-only views of the
    mapping (the engine's own copy into its parameters is the only one)."""

    def __init__(self, path: Path) -> None:
        self._map = _WARM.get(path)
        self.path = path
        if self._map[:8] != MAGIC:
            raise InvalidArgument(f"{path} is not an {FORMAT} segment")
        length = int.from_bytes(self._map[8:16], "little")
        try:
            header = json.loads(self._map[16 : 16 + length])
            assert header["format"] == FORMAT
        except (ValueError, KeyError, AssertionError):
            raise InvalidArgument(f"{path} has an unreadable {FORMAT} header") from None
        self.version: int = header["version"]
        self.digest: str = header["digest"]
        self._entries: list[dict] = header["tensors"]

    def tensors(self, expected: dict[str, tuple[int, ...]]) -> dict[str, TensorBytes]:
        """Every tensor as a view, after checking names, shapes, dtypes and bounds against `expected`."""
        names = {entry["name"] for entry in self._entries}
        if names != set(expected) or len(names) != len(self._entries):
            missing, unknown = sorted(set(expected) - names)[:3], sorted(names - set(expected))[:3]
            raise InvalidArgument(f"segment {self.path} holds other parameters (missing {missing}, unknown {unknown})")
        whole = np.frombuffer(self._map, dtype=np.uint8)
        views = {}
        for entry in self._entries:
            name, shape = entry["name"], tuple(entry["shape"])
            if shape != tuple(expected[name]):
                raise InvalidArgument(f"parameter {name!r} has shape {list(shape)}, not {list(expected[name])}")
            size, offset = expected_bytes(entry["dtype"], shape), entry["offset"]
            if entry["nbytes"] != size or offset < 0 or offset + size > len(whole):
                raise InvalidArgument(f"parameter {name!r} lies outside segment {self.path}")
            views[name] = TensorBytes(name, entry["dtype"], shape, whole[offset : offset + size])
        return views

    def verify(self, tensors: dict[str, TensorBytes], threads: int = 2) -> None:
        """Hash every mapped tensor (on `threads` threads: xxh3 releases the GIL) against the header's digest."""
        with ThreadPoolExecutor(threads) as pool:
            hashed = dict(zip(tensors, pool.map(lambda t: tensor_hash(t.data), tensors.values()), strict=True))

        def tree() -> str:
            return combine_tree({n: tree_record(n, t.dtype, t.shape, hashed[n]) for n, t in tensors.items()})

        verify(self.digest, tree, lambda: "a segment's digest is always xxh3-128-tree-v1")
