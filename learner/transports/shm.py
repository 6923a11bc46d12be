"""The "shm" transport (replicas on the learner's host) and "auto" (shm where it works, stream elsewhere).

The learner writes the weights once into a shared-memory segment (protos.weights_segment, in /dev/shm)
and calls `LoadWeights(path=<segment>, version)` on every replica; each maps the segment, verifies the
digest the learner computed from its own tensors, and swaps the views in (no copy before the engine's).

No leaks, whoever dies: the segment is an unnamed O_TMPFILE file that only gets a name in /dev/shm for
the length of one publication (linked before the first LoadWeights, unlinked when the last replica
answered, success or not). Its pages live as long as the learner holds the file open, or a replica
still maps it, and go away with them. Between publications the learner keeps the unnamed file (one per
process, `_SPARE`) so the next publication writes into warm pages: on the reference VM, faulting in
1 GB of new pages costs ~2 s, a copy into warm ones ~0.1 s. It reuses it only if every replica of the
last publication answered; after a timeout or a lost connection a replica might still be reading it,
so that file is dropped and the next publication starts a fresh one.

Same host: "auto" tries the segment first; a replica that cannot see it (another host, another /dev/shm)
answers NOT_FOUND, and gets the stream instead, now and (remembered per address) from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from learner.transports.base import ReplicaResult, WeightSource, WeightTransport
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.errors import Unavailable
from protos.weights_codec import TensorBytes, push_weight_update
from protos.weights_digest import TREE_V1, tree_digest
from protos.weights_segment import SEGMENT_PREFIX, layout, write_into

SHM_DIR = Path("/dev/shm")
_SPARE: list[int] = []
"""At most one unnamed segment file kept open between publications (warm pages)."""
_REMOTE: set[str] = set()
"""Addresses that could not see a segment: "auto" streams to them without trying again."""


class Segment:
    """One publication's segment: written, named for the replicas, then unnamed and kept or closed."""

    def __init__(self, version: int) -> None:
        self.fd = _SPARE.pop() if _SPARE else _open_unnamed()
        self.path = SHM_DIR / f"{SEGMENT_PREFIX}{os.getpid()}-v{version}-{secrets.token_hex(4)}"
        self.version = version
        self.named = False

    def write(self, tensors: list[TensorBytes]) -> None:
        """Hash the tensors (on another thread) while copying them in; then name the file for the replicas."""
        placeholder = f"{TREE_V1}:" + "0" * 32
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shm-digest") as pool:
            hashing = pool.submit(tree_digest, [(t.name, t.dtype, t.shape, t.data) for t in tensors])
            write_into(self.fd, self.version, tensors, placeholder)
            digest = hashing.result()
        os.pwrite(self.fd, layout(self.version, tensors, digest).header, 0)  # same length as the placeholder's
        try:
            os.link(f"/proc/self/fd/{self.fd}", self.path, follow_symlinks=True)
        except OSError:  # no O_TMPFILE linking here: a plain named file, unlinked after the publication
            _copy_file(self.fd, self.path)
        self.named = True

    def release(self, keep: bool) -> None:
        """Unname the segment; keep the open file for the next publication only if no replica may still read it."""
        if self.named:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.named = False
        if keep and not _SPARE:
            _SPARE.append(self.fd)
        else:
            os.close(self.fd)


def _open_unnamed() -> int:
    try:
        return os.open(SHM_DIR, os.O_TMPFILE | os.O_RDWR, 0o600)
    except (AttributeError, OSError):
        path = SHM_DIR / f"{SEGMENT_PREFIX}{os.getpid()}-tmp-{secrets.token_hex(4)}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        path.unlink()
        return fd


def _copy_file(fd: int, path: Path) -> None:
    size = os.fstat(fd).st_size
    with open(path, "wb") as out:
        os.sendfile(out.fileno(), fd, 0, size)


def _answered(result: ReplicaResult) -> bool:
    """Whether the replica finished with the segment (it answered), rather than timed out or vanished."""
    return not isinstance(result.error, Unavailable)  # a domain error is an answer; Unavailable may not be


class ShmTransport(WeightTransport):
    name = "shm"
    fallback_to_stream = False

    async def publish(self, version: int, source: WeightSource, targets: list[str]) -> list[ReplicaResult]:
        snapshot = await asyncio.to_thread(tensors_as_bytes, source.named_weights())
        streamed = [t for t in targets if self.fallback_to_stream and t in _REMOTE]
        mapped = [t for t in targets if t not in streamed]
        segment = Segment(version) if mapped else None
        results: dict[str, ReplicaResult] = {}
        try:
            if segment is not None:
                await asyncio.to_thread(segment.write, snapshot)

                async def load(channel: grpc.aio.Channel, address: str) -> int:
                    stub = rollout_pb2_grpc.RolloutServiceStub(channel)
                    request = rollout_pb2.LoadWeightsRequest(
                        path=str(segment.path), version=version, rewind=self.context.rewind
                    )
                    try:
                        await stub.LoadWeights(request)
                        return 0
                    except grpc.aio.AioRpcError as exc:
                        if not (self.fallback_to_stream and exc.code() == grpc.StatusCode.NOT_FOUND):
                            raise
                    _REMOTE.add(address)  # another host: the stream, now and from now on
                    return await push_weight_update(channel, version, snapshot, rewind=self.context.rewind)

                for result in await self.on_each_replica(mapped, load, pass_address=True):
                    results[result.address] = result
            for result in await self.on_each_replica(
                streamed, lambda channel: push_weight_update(channel, version, snapshot, rewind=self.context.rewind)
            ):
                results[result.address] = result
        finally:
            if segment is not None:
                segment.release(keep=all(_answered(r) for r in results.values()) and len(results) == len(targets))
        return [results[t] for t in targets]


class AutoTransport(ShmTransport):
    """shm for replicas that can map the learner's segments, stream for the others."""

    name = "auto"
    fallback_to_stream = True
