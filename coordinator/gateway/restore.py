"""Bring a gateway back after a restart from its journal (coordinator.gateway.journal).

In order: the futures (finished ones answer polls again; unfinished ones are pending), then each open
session with its sampling clients, then each of its training models - a new learner session loaded from
the model's newest durable state that verifies (or its initial state, or the base model), the requests
that changed it since then replayed in seq_id order (their results are already known; only their effect
on the state is wanted), and its seq_ids remembered so a retry gets its first request id. Requests that
were accepted but unfinished at the crash then run under their original ids, in order. A future that is
still pending after all that (an unload, say) fails with an error saying to send it again.

A model that cannot be rebuilt (its learner refuses, a body is gone) is reported by name to its client
(NOT_FOUND with the reason) rather than ending the restore: every other client still comes back.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from coordinator.client.learner_api import LearnerSession
from coordinator.gateway import tenancy
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.futures import USER_ERRORS, FutureStore, Outcome
from coordinator.gateway.journal import GatewayJournal, OpRecord
from coordinator.gateway.lora import session_fields
from coordinator.gateway.operations import STATE_CHANGING, Operation, decoded, work_of
from coordinator.gateway.sampler_weights import SamplerWeights
from coordinator.gateway.sampling import Sampling
from coordinator.gateway.sequencer import OrderedExecutor
from coordinator.gateway.sessions import SamplingSession, Session, SessionRegistry, TrainingModel
from coordinator.gateway.training import TrainingOps
from protos.errors import FailedPrecondition


class TinkerService(Protocol):
    """What the restore uses of coordinator.gateway.service.TinkerService (which calls it)."""

    config: GatewayConfig
    journal: GatewayJournal
    futures: FutureStore
    sessions: SessionRegistry
    sampling: Sampling
    training: TrainingOps
    sampler_weights: SamplerWeights
    learner_channel: grpc.aio.Channel
    learner_base_model: str
    restarted: set[str]

    async def run_operation(self, model: TrainingModel, operation: Operation) -> Any: ...

    def create_model_once(self, body: dict[str, Any], kind: str, request_id: str | None = None) -> dict[str, Any]: ...


log = logging.getLogger(__name__)


@dataclass
class RestoreSummary:
    sessions: int = 0
    training_clients: int = 0
    sampling_clients: int = 0
    replayed: int = 0
    """Requests replayed on a loaded state to rebuild a training client."""
    lost: int = 0
    """Training clients that could not be rebuilt (their clients are told why)."""

    def __str__(self) -> str:
        return (
            f"{self.sessions} session(s), {self.training_clients} training client(s) ({self.replayed} request(s) "
            f"replayed), {self.sampling_clients} sampling client(s); {self.lost} training client(s) lost"
        )


RESEND = "the server restarted before this request finished and cannot run it again; send it again"


async def restore_service(service: TinkerService) -> RestoreSummary:
    summary = RestoreSummary()
    pending = set(service.futures.restore())
    for session_id, doc in service.journal.open_sessions():
        summary.sessions += 1
        with tenancy.acting_as(doc["owner"]):
            session = Session(session_id, doc["user_metadata"], owner=doc["owner"])
            service.sessions.sessions[session_id] = session
            for sampler_doc in service.journal.docs("samplers", session_id):
                _restore_sampler(service, session, sampler_doc, pending)
            for model_doc in service.journal.docs("models", session_id):
                model_id = model_doc["model_id"]
                try:
                    summary.replayed += await _restore_model(service, session, model_doc, pending)
                    summary.training_clients += 1
                except Exception as exc:  # one model that cannot come back must not keep the rest away
                    log.error("training client %s could not be restored: %s", model_id, exc)
                    service.sessions.lost[model_id] = str(exc)
                    summary.lost += 1
            await _restore_creations(service, session, pending)
            summary.sampling_clients += len(session.samplers)
    for request_id in pending - service.restarted:
        if service.futures.finished(request_id) is None:
            service.futures.resolve(request_id, Outcome(error=RESEND, category="server"))
    return summary


def _restore_sampler(service: TinkerService, session: Session, doc: dict[str, Any], pending: set[str]) -> None:
    sampler_id = doc["sampling_session_id"]
    sampler = SamplingSession(sampler_id, doc["base_model"], Path(doc["snapshot"]), doc["model_path"])
    session.samplers[sampler_id] = sampler
    for op in service.journal.ops(sampler_id):
        sampler.requests[op.seq_id] = op.request_id
        if op.request_id in pending and op.body is not None:
            service.sampling.start(sampler, op.seq_id, json.loads(op.body), op.request_id)
            service.restarted.add(op.request_id)


async def _restore_creations(service: TinkerService, session: Session, pending: set[str]) -> None:
    """Model creations: each remembered for its retries; one unfinished at the crash is answered (its
    model came back complete) or run again."""
    for op in service.journal.ops(session.session_id):
        key = f"model:{op.seq_id}"
        session.requests[key] = op.request_id
        if op.request_id not in pending:
            continue
        body = json.loads(op.body)
        model_id = f"{session.session_id}:train:{op.seq_id}"
        model = session.models.get(model_id)
        if model is not None and op.kind == "create_model":
            service.futures.resolve(op.request_id, Outcome(value={"model_id": model_id, "type": "create_model"}))
        elif model is not None and model.initial_state is not None:
            answer = {"path": body.get("path"), "model_id": model_id, "type": "load_weights"}
            service.futures.resolve(op.request_id, Outcome(value=answer))
        else:  # not made, or made but its state not loaded yet: make it again
            if model is not None:
                session.models.pop(model_id)
                with contextlib.suppress(Exception):
                    await model.learner.close()
            service.journal.forget_model(model_id)
            del session.requests[key]
            service.restarted.add(op.request_id)
            with contextlib.suppress(Exception):  # its own future reports what goes wrong
                service.create_model_once(body, op.kind, op.request_id)


async def _restore_model(service: TinkerService, session: Session, doc: dict[str, Any], pending: set[str]) -> int:
    """Rebuild one training model; return how many requests were replayed on its loaded state."""
    model_id = doc["model_id"]
    lora = doc.get("lora")
    learner = await LearnerSession.create(
        service.learner_channel, service.learner_base_model, seed=doc["seed"], **session_fields(lora)
    )
    model = TrainingModel(
        model_id,
        doc["base_model"],
        learner,
        OrderedExecutor(service.futures, service.config.sequence_gap_timeout_s),
        doc["user_metadata"],
        owner=doc["owner"],
        seed=doc["seed"],
        lora=lora,
        initial_state=doc["initial_state"],
        durable_states=[(seq_id, path) for seq_id, path in doc["durable_states"]],
        unnamed_snapshots=deque(Path(path) for path in doc["unnamed_snapshots"]),
        last_snapshot=doc["last_snapshot"],
    )
    replayed = 0
    try:
        base_seq_id = await _load_newest_state(model)
        ops = service.journal.ops(model_id)
        for op in ops:
            if op.request_id in pending:
                continue
            if op.seq_id > base_seq_id and op.kind in STATE_CHANGING:
                replayed += await _replay(service, model, op)
            model.executor.restore_finished(op.seq_id, op.fingerprint, op.kind, op.request_id)
    except BaseException:
        with contextlib.suppress(Exception):
            await learner.close()
        raise
    session.models[model_id] = model
    for op in ops:
        if op.request_id in pending and op.body is not None:
            work = functools.partial(service.run_operation, model, decoded(op.kind, op.body, op.codec))
            model.executor.submit(op.seq_id, op.fingerprint, op.kind, work, request_id=op.request_id)
            service.restarted.add(op.request_id)
    return replayed


async def _load_newest_state(model: TrainingModel) -> int:
    """Load the newest durable state that verifies; return the seq_id it covers (0: none, so the model
    starts from its initial state or the base weights)."""
    failures = []
    for seq_id, path in reversed(model.durable_states):
        try:
            await model.learner.load_state(path, with_optimizer=True)
        except Exception as exc:  # incomplete at the crash (or damaged): an older one may do
            failures.append(f"{Path(path).name}: {exc}")
            continue
        model.durable_states = [(s, p) for s, p in model.durable_states if s <= seq_id]
        return seq_id
    if failures:
        raise FailedPrecondition(f"none of its durable states loads ({'; '.join(failures)})")
    if model.initial_state is not None:
        await model.learner.load_state(model.initial_state["path"], with_optimizer=model.initial_state["optimizer"])
    return 0


async def _replay(service: TinkerService, model: TrainingModel, op: OpRecord) -> int:
    """Redo `op`'s effect on the model's state (its result was answered before the restart); 1 if redone."""
    outcome = service.futures.finished(op.request_id)
    if outcome is not None and outcome.error is not None:
        return 0  # it failed then, and changed nothing
    if op.body is None:
        raise FailedPrecondition(f"the body of its request seq_id {op.seq_id} ({op.kind}) is no longer kept")
    try:
        await work_of(decoded(op.kind, op.body, op.codec), service.training, service.sampler_weights)(model)
    except USER_ERRORS:
        if outcome is not None:
            raise
        return 0  # its outcome expired from the journal: an error now is the error it had then
    return 1
