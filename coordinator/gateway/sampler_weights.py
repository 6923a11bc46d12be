"""`save_weights_for_sampler`: servable weights of a training client, in the one of three forms it asks for.

- With a name, on a gateway with a snapshot store (an RLOR trainer job's): a snapshot *by identity*,
  full (`base`) or as a delta from this client's previous one, which a deployment can hot-load.
- With a name otherwise: a named checkpoint, `tinker://<run>/sampler_weights/<name>`.
- Without a name (`save_weights_and_get_sampling_client`): an unnamed snapshot as of this seq_id, bound
  to a new sampling session. Only the `sampler_snapshots_kept` most recently used of a client are kept
  (made, or sampled from: `SessionRegistry.touch_snapshot`): they are whole weight copies, written for
  every sampling client an RL loop asks for, so the old policies a loop no longer samples go, while a
  snapshot sampled from at least once between every `kept` new ones - a DPO reference scored every
  step, a teacher - stays however many follow. A deleted one's sampling clients answer NOT_FOUND saying
  so. The order is journalled with the client's durable state, so after a gateway restart it is the
  order of the last one (a use since then is forgotten: at most one step's worth).
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

from coordinator.gateway.bodies import SaveWeights, parse
from coordinator.gateway.checkpoints import CheckpointStore
from coordinator.gateway.sessions import SamplingSession, SessionRegistry, TrainingModel
from coordinator.gateway.snapshot_store import SnapshotStore
from protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument


class SamplerWeights:
    def __init__(
        self, sessions: SessionRegistry, checkpoints: CheckpointStore, snapshots: SnapshotStore | None, kept: int
    ) -> None:
        self.sessions = sessions
        self.checkpoints = checkpoints
        self.snapshots = snapshots
        """Where named sampler weights go by identity (service-mode trainer jobs, for hot-load); else None."""
        self.kept = kept

    async def save(self, model: TrainingModel, body: dict[str, Any], seq_id: int) -> dict[str, Any]:
        request = parse(SaveWeights, body)
        name = request.path
        if name and self.snapshots is not None:
            return await self._save_snapshot(model, name, request.checkpoint_type or "base")
        if name:
            self.checkpoints.expiry(request.ttl_seconds)  # a bad TTL is refused before the learner writes
            try:
                reply = await model.learner.save_weights(name)
            except AlreadyExists:  # the learner's message names its directory; the client knows the name
                message = f"sampler weights {name!r} of this training run already exist; choose another name"
                raise AlreadyExists(message) from None
            record = self.checkpoints.add(
                model.model_id, "sampler_weights", name, reply.path, model.base_model, model.owner,
                request.ttl_seconds, request.user_metadata,
            )  # fmt: skip
            return {"path": record.path, "type": "save_weights_for_sampler"}
        if request.sampling_session_seq_id is None:
            raise InvalidArgument("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
        session_id = model.model_id.split(":", 1)[0]
        sampler_id = f"{session_id}:sample:{request.sampling_session_seq_id}"
        reply = await model.learner.save_weights(f"snapshot-{seq_id}", overwrite=True)
        snapshot = Path(reply.path)
        model.unnamed_snapshots.append(snapshot)
        while len(model.unnamed_snapshots) > self.kept:
            shutil.rmtree(model.unnamed_snapshots.popleft(), ignore_errors=True)
        session = self.sessions.get(session_id)
        self.sessions.add_sampler(session, SamplingSession(sampler_id, model.base_model, snapshot))
        return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

    async def _save_snapshot(self, model: TrainingModel, identity: str, checkpoint_type: str) -> dict[str, Any]:
        """A sampler snapshot by identity, full or as a delta from this model's previous one (hot-loadable)."""
        if checkpoint_type not in ("base", "delta"):
            raise InvalidArgument(
                f"checkpoint_type {checkpoint_type!r} is not available for full-parameter training; use base or delta"
            )
        if checkpoint_type == "delta" and model.last_snapshot is None:
            raise FailedPrecondition("a delta snapshot needs an earlier snapshot from this client; save a base first")
        self.snapshots.path(identity)  # validates the name before any work
        reply = await model.learner.save_weights(f"sampler-{identity}", overwrite=True)
        if checkpoint_type == "base":
            meta = await asyncio.to_thread(self.snapshots.add_base, identity, Path(reply.path), model.owner)
        else:
            meta = await asyncio.to_thread(
                self.snapshots.add_delta, identity, Path(reply.path), model.last_snapshot, model.owner
            )
        model.last_snapshot = identity
        return {"path": identity, "type": "save_weights_for_sampler", "checkpoint_type": meta["kind"]}
