"""Versioned, atomic weight updates of a serving engine.

The transaction: `begin(version)` opens a staging area (versions only increase; a newer begin
discards an older open one); `push(version, chunks)` stages chunks through protos.weights_codec's
ChunkAssembler, which rejects unknown names, wrong shapes and overlapping bytes as they arrive; a
stream that errors or is cut off discards the staging area; `commit(version, digest)` verifies the
digest and that every parameter arrived complete, and only then swaps the weights in. `load_directory`
hot-loads a checkpoint directory the same way, or a LoRA adapter directory (rollout/adapters.py).

A swap happens inside the ServingGate's `swap_window`. With the engine's `swap_mode = "inflight"` (the
default) that is the engine's token boundary: running requests pause between two tokens, the weights and
version change, they go on, and each token carries the version that produced it. With "drain", every
Sample/ComputeLogprobs holds a read slot of the gate for its whole run; the swap takes the write slot,
which waits for running requests to finish and holds new ones until the new weights are live.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import torch
from safetensors import safe_open

from protos.errors import FailedPrecondition, InvalidArgument, NotFound
from protos.weights_assembler import ChunkAssembler
from protos.weights_codec import TensorBytes
from protos.weights_segment import MappedSegment
from rollout.adapters import is_adapter, read_adapter
from rollout.engines.base import RolloutEngine
from servicekit.failpoints import failpoint

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_shapes(directory: Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a Hugging Face directory's safetensors, from the headers only."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise NotFound(f"{directory} holds no *.safetensors weights; point at a directory written by SaveWeights")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(file, "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


class ServingGate:
    """Many readers (requests) or one writer (a swap); a waiting writer blocks new readers.

    Only swaps in "drain" mode take the write slot; in-flight swaps leave readers alone."""

    def __init__(self) -> None:
        self._condition = asyncio.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[None]:
        async with self._condition:
            await self._condition.wait_for(lambda: not self._writer and self._writers_waiting == 0)
            self._readers += 1
        try:
            yield
        finally:
            async with self._condition:
                self._readers -= 1
                self._condition.notify_all()

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        async with self._condition:
            self._writers_waiting += 1
            try:
                await self._condition.wait_for(lambda: not self._writer and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            async with self._condition:
                self._writer = False
                self._condition.notify_all()

    @contextlib.asynccontextmanager
    async def swap_window(self, engine: RolloutEngine) -> AsyncIterator[None]:
        """Where a swap runs: the engine's token boundary, behind the write slot when the engine drains."""
        async with contextlib.AsyncExitStack() as stack:
            if engine.swap_mode == "drain":
                await stack.enter_async_context(self.writing())
            await stack.enter_async_context(engine.swapping())
            yield


class WeightUpdater:
    """Owns the serving version and the (at most one) open staging area of an engine."""

    def __init__(self, engine: RolloutEngine, expected_shapes: dict[str, tuple[int, ...]]) -> None:
        self.engine = engine
        self.gate = ServingGate()
        self._expected = expected_shapes
        self._lock = asyncio.Lock()
        self._open_version: int | None = None
        self._assembler: ChunkAssembler | None = None
        self._last_abort_reason = ""
        self._spare: dict = {}
        """Staging buffers of the last update, written into by the next one (warm pages: see ChunkAssembler)."""
        self._spare_version, self._spare_digest = 0, ""
        """The version whose exact bytes `_spare` holds (its last committed push; 0: none) and the digest
        they were verified against: the base that lossless delta chunks apply to. A failed or aborted update
        may have written into them: 0 again."""

    @property
    def version(self) -> int:
        return self.engine.weight_version

    def _require_newer(self, version: int, rewind: bool = False) -> None:
        """Versions only increase, except on a rewind (the learner restored an earlier checkpoint)."""
        if rewind:
            if version < 0:
                raise InvalidArgument(f"version {version} is negative; versions count steps from 0")
            return
        if version <= self.engine.weight_version:
            raise FailedPrecondition(
                f"version {version} is not newer than the served version {self.engine.weight_version}; "
                "versions only increase"
            )

    def _require_open(self, version: int) -> ChunkAssembler:
        if self._open_version != version or self._assembler is None:
            why = f" ({self._last_abort_reason})" if self._last_abort_reason else ""
            raise FailedPrecondition(
                f"no weight update is open for version {version}{why}; call BeginWeightUpdate({version}) first"
            )
        return self._assembler

    def _discard(self, reason: str, committed: int = 0, digest: str = "") -> None:
        """Close the open update; `committed` is its version when it was swapped in (its buffers then hold
        exactly that version's bytes, verified against `digest`)."""
        if self._assembler is not None:
            self._spare = self._assembler.spare_buffers()
            self._spare_version, self._spare_digest = (committed, digest) if digest else (0, "")
        self._open_version, self._assembler, self._last_abort_reason = None, None, reason

    async def begin(self, version: int, rewind: bool = False) -> tuple[int, str]:
        """Open an update to `version` (any version with `rewind`); the version (0: none) and digest of the
        bytes it holds for deltas."""
        async with self._lock:
            self._require_newer(version, rewind)
            self._discard("")  # an open update may have written into the buffers: they hold no base now
            base = (self._spare_version, self._spare_digest)
            assembler = ChunkAssembler(self._expected, self._spare, self._spare_version)
            self._open_version, self._assembler, self._spare = version, assembler, {}
            self._spare_version, self._spare_digest = 0, ""
            return base

    async def push(self, requests: AsyncIterator) -> tuple[int, int]:
        """Stage a stream of PushWeightsRequests; any error (or a cut stream) discards the staging area."""
        chunks = bytes_ = 0
        version: int | None = None
        try:
            async for request in requests:
                version = request.version
                assembler = self._require_open(version)
                staged_before = assembler.num_bytes
                assembler.add(request.chunk)
                failpoint("rollout.push")
                chunks += 1
                bytes_ += assembler.num_bytes - staged_before  # not len(chunk.data): each read copies the bytes
        except FailedPrecondition:
            raise
        except BaseException as exc:  # a bad chunk, or the client cut the stream (CancelledError)
            if version is not None and self._open_version == version:
                self._discard(f"its push stream failed: {exc or type(exc).__name__}")
            raise
        return chunks, bytes_

    async def commit(self, version: int, digest: str) -> float:
        async with self._lock:
            assembler = self._require_open(version)
            try:
                staged = await asyncio.to_thread(assembler.finish, digest)  # a sha256 digest is a full pass
            except InvalidArgument as exc:
                self._discard(f"its commit was rejected: {exc}")
                raise
            tensors = {name: _to_torch(tensor) for name, tensor in staged.items()}
            seconds = await self._swap(version, lambda: self.engine.load_weights(tensors))
            self._discard("", committed=version, digest=digest)
            return seconds

    async def _swap(self, version: int, load: Callable[[], Awaitable[None]]) -> float:
        """Put new weights in as `version` inside the engine's swap window (the caller holds `_lock`);
        the seconds it took."""
        start = time.perf_counter()
        async with self.gate.swap_window(self.engine):
            await load()
            self.engine.weight_version = version
        return time.perf_counter() - start

    async def abort(self, version: int) -> None:
        async with self._lock:
            self._require_open(version)
            self._discard(f"it was aborted by AbortWeightUpdate({version})")

    async def load_directory(self, path: Path, version: int, rewind: bool = False) -> float:
        if not path.is_dir():
            raise NotFound(f"no model directory at {path}")
        if is_adapter(path):  # a LoRA session's weights: an adapter on the served base model
            layers = await asyncio.to_thread(read_adapter, path, self._expected)
            async with self._lock:
                self._require_newer(version, rewind)
                return await self._swap(version, lambda: self.engine.load_adapter(path, layers))
        shapes = await asyncio.to_thread(checkpoint_shapes, path)
        if shapes != self._expected:
            missing = sorted(set(self._expected) - set(shapes))[:3]
            unknown = sorted(set(shapes) - set(self._expected))[:3]
            reshaped = sorted(n for n in set(shapes) & set(self._expected) if shapes[n] != self._expected[n])[:3]
            raise InvalidArgument(
                f"{path} does not hold the served model's parameters (missing {missing}, unknown {unknown}, "
                f"reshaped {reshaped})"
            )
        async with self._lock:
            self._require_newer(version, rewind)
            return await self._swap(version, lambda: self.engine.load_weights_from_directory(path))

    async def load_segment(self, path: Path, version: int, rewind: bool = False) -> float:
        """Hot-load an `anvil-shm-v1` segment the learner's shm transport wrote: checked against the served
        names and shapes, its mapped bytes hashed against the learner's digest, then swapped in from the
        mapping itself (the engine's copy into its parameters is the only one)."""
        segment = await asyncio.to_thread(MappedSegment, path)
        if segment.version != version:
            raise InvalidArgument(f"segment {path} holds version {segment.version}, not {version}")
        views = segment.tensors(self._expected)
        await asyncio.to_thread(segment.verify, views)
        with warnings.catch_warnings():  # read-only views of a read-only mapping: engines only copy from them
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = {name: _to_torch(tensor) for name, tensor in views.items()}
        del views
        async with self._lock:
            self._require_newer(version, rewind)
            return await self._swap(version, lambda: self.engine.load_weights(tensors))


def _to_torch(tensor: TensorBytes) -> torch.Tensor:
    dtype = TORCH_DTYPES[tensor.dtype]
    if math.prod(tensor.shape) == 0:
        return torch.empty(tensor.shape, dtype=dtype)
    return torch.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
