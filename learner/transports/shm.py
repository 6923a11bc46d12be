"""The "shm" transport (replicas on the learner's host) and "auto" (shm where it works, stream elsewhere).

The learner writes the weights once into a shared-memory segment (protos.weights_segment, in /dev/shm)
and calls `LoadWeights(path=<segment>, version)` on every replica; each maps the segment, verifies the
digest the learner computed from its own tensors, and copies the views into its engine.

Warm pages, both sides: a learner keeps one segment file (`_SPARE`) and its mapping between
publications, so the next one is a plain copy into pages that exist and are mapped (on the reference
VM, a fresh 1 GB file costs ~0.6 s of page faults and zeroing, the copy ~0.06 s), and a replica that
sees the same file again reuses its own mapping (protos.weights_segment). The learner reuses the file
only if every replica of the last publication answered; after a timeout or a lost connection a replica
might still be reading it, so that file is removed and the next publication starts a fresh one.

Why the spare keeps its name: an unnamed (O_TMPFILE) file can be linked only once, so an unnamed spare
could not be named again for the next publication, and copying it into a named file costs more than
the copy it saves. The price is that a learner killed with SIGKILL leaves its file behind; the next
learner on the host that publishes removes every segment whose process is gone (`_sweep_orphans`), and
a learner that exits normally removes its own (atexit).

Same host: "auto" tries the segment first; a replica that cannot see it (another host, another /dev/shm)
answers NOT_FOUND, and gets the stream instead, now and (remembered per address) from then on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import mmap
import os
import re
import secrets
from pathlib import Path

import grpc

from learner.transports.base import ReplicaResult, WeightSource, WeightTransport
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.errors import Unavailable
from protos.weights_codec import TensorBytes, push_weight_update
from protos.weights_digest import TREE_V1, combine_tree, tree_record
from protos.weights_segment import SEGMENT_PREFIX, layout, write_into

SHM_DIR = Path("/dev/shm")
_OWNER = re.compile(rf"{re.escape(SEGMENT_PREFIX)}(\d+)-")


class SegmentFile:
    """One named segment file of this process and its writable mapping, grown as needed, never shrunk."""

    def __init__(self) -> None:
        _sweep_orphans()
        self.path = SHM_DIR / f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        self.mapping: mmap.mmap | None = None

    def mapped(self, size: int) -> mmap.mmap:
        """A shared mapping of at least `size` bytes. MAP_POPULATE maps every page in one call instead of
        one write fault per 4 KiB page; kept between publications, it is paid once."""
        if os.fstat(self.fd).st_size < size:  # also mends a file someone truncated (else: SIGBUS on write)
            os.ftruncate(self.fd, size)
        if self.mapping is None or len(self.mapping) < size:
            self._unmap()
            self.mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        return self.mapping

    def _unmap(self) -> None:
        if self.mapping is not None:
            with contextlib.suppress(BufferError):  # a view still alive keeps it until collected
                self.mapping.close()
            self.mapping = None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._unmap()
        os.close(self.fd)


_SPARE: list[SegmentFile] = []
"""At most one segment file kept between publications (warm pages, a name replicas may already map)."""
_REMOTE: set[str] = set()
"""Addresses that could not see a segment: "auto" streams to them without trying again."""


@atexit.register
def _remove_spare() -> None:
    while _SPARE:
        _SPARE.pop().remove()


def _sweep_orphans() -> None:
    """Remove the segment files of processes that are gone (a learner killed before it could clean up)."""
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}*"):
        owner = _OWNER.match(path.name)
        if owner is None or int(owner.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(owner.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        except PermissionError:  # alive, someone else's
            pass


class Segment:
    """One publication's segment: written into this process's segment file, then kept warm or removed."""

    def __init__(self, version: int) -> None:
        self.file = _SPARE.pop() if _SPARE else SegmentFile()
        self.path = self.file.path
        self.version = version

    def write(self, tensors: list[TensorBytes]) -> None:
        """Copy the tensors in, hashing each block as it is copied, then write the header with the digest."""
        plan = layout(self.version, tensors, f"{TREE_V1}:" + "0" * 32)  # a placeholder of the digest's length
        hashes = write_into(self.file.mapped(plan.total), plan, tensors)
        digest = combine_tree({t.name: tree_record(t.name, t.dtype, t.shape, hashes[t.name]) for t in tensors})
        header = layout(self.version, tensors, digest).header  # same length as the placeholder's
        self.file.mapping[: len(header)] = header

    def release(self, keep: bool) -> None:
        """Keep the file for the next publication only if no replica may still read it; else remove it."""
        if keep and not _SPARE:
            _SPARE.append(self.file)
        else:
            self.file.remove()


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
