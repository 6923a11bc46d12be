"""Training sessions: one model + optimizer each, and the registry that enforces the session limit."""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from learner.backends import build_backend
from learner.backends.base import LearnerBackend
from learner.backends.lora import lora_spec
from learner.background_writes import BackgroundWrites
from learner.config import LearnerConfig
from learner.transports.base import PublishedWeights
from protos.anvil.v1 import learner_pb2
from protos.errors import FailedPrecondition, NotFound
from servicekit.paths import user_path
from servicekit.sequencer import GapPolicy, Sequencer

_BYTES_PER_PARAMETER = 16
"""float32 weights + gradients + AdamW's two moments."""


@dataclass
class TrainingSession:
    session_id: str
    base_model: str
    backend: LearnerBackend
    sequencer: Sequencer
    checkpoint_root: Path
    """<checkpoint_dir>/<session_id>: SaveState writes under state/, SaveWeights under weights/."""
    published: PublishedWeights | None = None
    """The weights it last streamed to rollout, for lossless deltas (None when LearnerConfig.weight_deltas is off)."""
    writes: BackgroundWrites = field(default_factory=BackgroundWrites)
    """Checkpoints SaveState(background) answered for and still writes."""


class SessionRegistry:
    def __init__(self, config: LearnerConfig) -> None:
        self._config = config
        self._sessions: dict[str, TrainingSession] = {}
        self._lock = asyncio.Lock()

    def get(self, session_id: str) -> TrainingSession:
        session = self._sessions.get(session_id)
        if session is None:
            raise NotFound(f"unknown session {session_id!r}; create one with CreateSession")
        return session

    def resolve_model(self, base_model: str) -> Path:
        """A configured model name, or a Hugging Face directory."""
        if base_model in self._config.models:
            return self._config.models[base_model]
        path = user_path(base_model)
        if path.is_dir() and (path / "config.json").is_file():
            return path.resolve()
        known = ", ".join(sorted(self._config.models)) or "none configured"
        raise NotFound(
            f"unknown base_model {base_model!r}: give a Hugging Face model directory or a configured name ({known})"
        )

    async def create(self, base_model: str, lora_rank: int, seed: int, lora_options=None) -> TrainingSession:
        lora = lora_spec(lora_rank, lora_options or learner_pb2.LoraOptions())
        if lora is not None and not self._config.allow_lora:
            raise FailedPrecondition(
                f"lora_rank={lora_rank}: this learner trains full parameters only; set lora_rank to 0, or start "
                "the learner with allow_lora = true"
            )
        model_path = self.resolve_model(base_model)
        async with self._lock:
            limit = self._config.max_sessions
            if len(self._sessions) >= limit:
                raise FailedPrecondition(
                    f"the learner already holds {len(self._sessions)} open session(s) (max_sessions={limit}); "
                    "close one with CloseSession or start the learner with a larger max_sessions"
                )
            _check_memory(model_path)
            backend = await asyncio.to_thread(build_backend, self._config.backend, model_path, seed, lora)
            session_id = f"sess-{uuid.uuid4().hex[:12]}"
            session = TrainingSession(
                session_id=session_id,
                base_model=base_model,
                backend=backend,
                sequencer=Sequencer(
                    self._config.sequence_gap_timeout_s, self._config.dedup_cache_size, GapPolicy.FAIL_WAITING
                ),
                checkpoint_root=self._config.checkpoint_dir / session_id,
                published=PublishedWeights() if self._config.weight_deltas else None,
            )
            self._sessions[session_id] = session
            return session

    async def close(self, session_id: str) -> None:
        async with self._lock:
            session = self.get(session_id)
            del self._sessions[session_id]
        await session.sequencer.close(FailedPrecondition(f"session {session_id} was closed"))
        await session.writes.settle()  # a checkpoint it answered for is complete before the session goes
        await asyncio.to_thread(session.backend.close)


def _check_memory(model_path: Path) -> None:
    """Refuse a session whose weights, gradients and AdamW state would not fit in available memory."""
    from safetensors import safe_open

    num_parameters = 0
    for file in model_path.glob("*.safetensors"):
        with safe_open(file, "pt") as handle:
            num_parameters += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
    needed = num_parameters * _BYTES_PER_PARAMETER
    available = _available_memory_bytes()
    if available is not None and needed > available:
        raise FailedPrecondition(
            f"a session of {model_path} needs about {needed / 2**30:.1f} GiB (weights, gradients, AdamW) but "
            f"only {available / 2**30:.1f} GiB is available; close a session or use a smaller model"
        )


def _available_memory_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
