"""Tinker sessions, their training models and sampling clients, and heartbeat expiry.

A session is what one `tinker.ServiceClient` holds: it heartbeats every 10 s and ends with
`sessions/{id}/finish`. A silent session is closed after `session_timeout_s`; closing one releases its
learner sessions (model and AdamW memory) and its sampling clients. A finished session answers
heartbeats with 410, which stops the SDK's heartbeat loop. With a journal, sessions and sampling clients
are recorded as they are made and a finished session is marked so; a server that stops *suspends* its
sessions instead (they are restored when it starts again: coordinator.gateway.restore).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.client.learner_api import LearnerSession
from coordinator.gateway import tenancy
from coordinator.gateway.checkpoints import utc_now
from coordinator.gateway.journal import GatewayJournal
from coordinator.gateway.sequencer import OrderedExecutor
from protos.errors import NotFound


@dataclass
class TrainingModel:
    """One TrainingClient: a learner session whose requests run in seq_id order."""

    model_id: str
    base_model: str
    learner: LearnerSession
    executor: OrderedExecutor
    user_metadata: dict[str, str] = field(default_factory=dict)
    last_request_time: str = field(default_factory=utc_now)
    unnamed_snapshots: deque[Path] = field(default_factory=deque)
    """Directories of this model's unnamed sampler snapshots, least recently used first (made or sampled
    from; deleted with the session)."""
    loss_tokens: int = 0
    """Tokens with a nonzero weight (or advantage) accumulated since the last optim_step."""
    loss_sequences: int = 0
    """Datums accumulated since the last optim_step."""
    last_snapshot: str | None = None
    """The last sampler snapshot identity this model saved (the previous link of a delta chain)."""
    owner: str = ""
    """The tenant whose session made it (coordinator.gateway.tenancy): its checkpoints are that tenant's."""
    seed: int = 0
    lora: dict | None = None
    """Its LoRA adapter (coordinator.gateway.lora's form), None for full-parameter training."""
    initial_state: dict | None = None
    """{"path", "optimizer"}: the training state it was created from (create-via-load), else None."""
    durable_states: list[tuple[int, str]] = field(default_factory=list)
    """(seq_id, learner path) of the states a restart restores it from, oldest first (journal.py)."""
    steps_since_durable: int = 0


@dataclass
class SamplingSession:
    """One SamplingClient: the snapshot it samples from, and its submitted seq_ids (for dedup)."""

    sampling_session_id: str
    base_model: str
    snapshot: Path
    model_path: str | None = None
    requests: dict[int, str] = field(default_factory=dict)


@dataclass
class Session:
    session_id: str
    user_metadata: dict[str, str]
    last_heartbeat: float = field(default_factory=time.monotonic)
    finished: bool = False
    models: dict[str, TrainingModel] = field(default_factory=dict)
    samplers: dict[str, SamplingSession] = field(default_factory=dict)
    owner: str = field(default_factory=tenancy.current)
    """The tenant that made it; to every other tenant, the session and all it holds do not exist."""
    requests: dict[str, str] = field(default_factory=dict)
    """Dedup of create_model / create-via-load / sampling-session creation: "<op>:<seq>" -> request id."""


def sampler_doc(sampler: SamplingSession) -> dict:
    return {
        "sampling_session_id": sampler.sampling_session_id,
        "base_model": sampler.base_model,
        "snapshot": str(sampler.snapshot),
        "model_path": sampler.model_path,
    }


class SessionRegistry:
    def __init__(self, journal: GatewayJournal | None = None) -> None:
        self.sessions: dict[str, Session] = {}
        self.journal = journal
        self.lost: dict[str, str] = {}
        """Training model id -> why a restart could not restore it (its requests then say so)."""

    def create(self, user_metadata: dict[str, str]) -> Session:
        session = Session(f"sess-{secrets.token_hex(6)}", dict(user_metadata or {}))
        self.sessions[session.session_id] = session
        if self.journal is not None:
            doc = {"owner": session.owner, "user_metadata": session.user_metadata}
            self.journal.put("sessions", session.session_id, doc)
        return session

    def add_sampler(self, session: Session, sampler: SamplingSession) -> None:
        session.samplers[sampler.sampling_session_id] = sampler
        if self.journal is not None:
            self.journal.put("samplers", sampler.sampling_session_id, sampler_doc(sampler), session.session_id)

    def get(self, session_id: str) -> Session:
        """The caller's open session `session_id` (another tenant's is NOT_FOUND, like one never made)."""
        session = self._open(session_id)
        if session is None:
            raise NotFound(f"no open session {session_id!r}; it finished or expired (create a new ServiceClient)")
        return session

    def open_sessions(self) -> list[Session]:
        """The caller's open sessions."""
        return [s for s in self.sessions.values() if not s.finished and tenancy.owns(s.owner)]

    def model(self, model_id: str) -> TrainingModel:
        session = self._open(model_id.split(":", 1)[0])
        model = session.models.get(model_id) if session is not None else None
        if model is None:
            if model_id in self.lost and session is not None:
                raise NotFound(f"training model {model_id!r} was lost in a server restart: {self.lost[model_id]}")
            raise NotFound(f"no training model {model_id!r}; its session finished or it was never created")
        return model

    def sampler(self, sampling_session_id: str) -> SamplingSession:
        session = self._open(sampling_session_id.split(":", 1)[0])
        sampler = session.samplers.get(sampling_session_id) if session is not None else None
        if sampler is None:
            raise NotFound(f"no sampling session {sampling_session_id!r}")
        return sampler

    def touch_snapshot(self, sampler: SamplingSession) -> None:
        """A sampled-from unnamed snapshot becomes its training client's most recently used one
        (sampler_weights.py deletes the least recently used beyond `sampler_snapshots_kept`)."""
        session = self._open(sampler.sampling_session_id.split(":", 1)[0])
        for model in session.models.values() if session is not None else ():
            if sampler.snapshot in model.unnamed_snapshots:
                model.unnamed_snapshots.remove(sampler.snapshot)
                model.unnamed_snapshots.append(sampler.snapshot)

    def _open(self, session_id: str) -> Session | None:
        session = self.sessions.get(session_id)
        return session if session is not None and not session.finished and tenancy.owns(session.owner) else None

    def expired(self, timeout_s: float) -> list[Session]:
        cutoff = time.monotonic() - timeout_s
        return [s for s in self.sessions.values() if not s.finished and s.last_heartbeat < cutoff]

    async def finish(self, session: Session, reason: str) -> None:
        """Close the session: its queued requests fail with `reason`, its learner sessions and unnamed
        snapshots are released, and its sampling clients are forgotten."""
        session.finished = True
        if self.journal is not None:
            self.journal.finish_session(session.session_id)
        await self._release(session, f"the session {reason}", delete_snapshots=True)

    async def suspend_all(self, reason: str) -> None:
        """The server stops: release every open session's learner sessions and queued requests, but keep
        their journal records and snapshots, so that a restart restores them (without a journal: finish)."""
        if self.journal is None:
            await self.finish_all(reason)
            return
        for session in self.sessions.values():
            if not session.finished:
                await self._release(session, reason, delete_snapshots=False)

    async def _release(self, session: Session, reason: str, delete_snapshots: bool) -> None:
        for model in session.models.values():
            await model.executor.close(reason)
            with contextlib.suppress(Exception):
                await model.learner.close()
            if delete_snapshots:
                for snapshot in [*model.unnamed_snapshots, *(path for _, path in model.durable_states)]:
                    shutil.rmtree(snapshot, ignore_errors=True)
        session.models.clear()
        session.samplers.clear()

    async def finish_all(self, reason: str) -> None:
        for session in list(self.sessions.values()):
            if not session.finished:
                await self.finish(session, reason)

    async def expire_forever(self, timeout_s: float) -> None:
        """Finish every session that has not sent a heartbeat for `timeout_s` (run as a task)."""
        while True:
            await asyncio.sleep(min(10.0, timeout_s / 2))
            for session in self.expired(timeout_s):
                await self.finish(session, "expired: no heartbeat")
