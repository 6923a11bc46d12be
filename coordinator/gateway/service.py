"""TinkerService: one Tinker gateway's state, and the life of its training clients.

The routes (app.py) parse HTTP and call into this object and the pieces it holds: `training` (the
sequenced learner operations), `sampler_weights` (save_weights_for_sampler), `sampling` (sampling
clients), `checkpoints`, `training_runs`, `sessions` and `futures`. What stays here is what ties them
together: creating a training client (a learner session plus its OrderedExecutor, deduplicated by the
client's model_seq_id), creating one from a saved state, unloading one, and submitting a request to a
client's executor. `anvil serve` builds one for its own `/api/v1`; service mode builds one per RLOR
trainer job (Fireworks dialect, a snapshot store, no rollout router).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import grpc

from coordinator.client.learner_api import LearnerSession
from coordinator.gateway.bodies import ModelSettings, NewModel, OptimizerConfig, parse
from coordinator.gateway.checkpoints import CheckpointStore, utc_now
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.durable_states import DurableStates
from coordinator.gateway.futures import FutureStore
from coordinator.gateway.journal import GatewayJournal, OpRecord
from coordinator.gateway.lora import lora_from_body, lora_of_checkpoint, session_fields, tinker_fields
from coordinator.gateway.operations import Operation, work_of
from coordinator.gateway.restore import RestoreSummary, restore_service
from coordinator.gateway.sampler_weights import SamplerWeights
from coordinator.gateway.sampling import Sampling
from coordinator.gateway.sampling_models import SamplingOnlyModels
from coordinator.gateway.sequencer import OrderedExecutor
from coordinator.gateway.sessions import Session, SessionRegistry, TrainingModel
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.gateway.training import TrainingOps
from coordinator.gateway.training_runs import TrainingRuns
from protos.errors import InvalidArgument, NotFound
from servicekit.failpoints import failpoint

log = logging.getLogger(__name__)


def fingerprint(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


class TinkerService:
    def __init__(
        self,
        config: GatewayConfig,
        learner_channel: grpc.aio.Channel,
        learner_base_model: str,
        model_dir: Path,
        router: SnapshotRouter | None,
        snapshots: SnapshotStore | None = None,
        sampling_only: SamplingOnlyModels | None = None,
    ) -> None:
        self.config = config
        self.learner_channel = learner_channel
        self.learner_base_model = learner_base_model
        """The model name the learner knows (its directory when this process started it)."""
        self.model_dir = model_dir
        self.router = router
        self.journal = GatewayJournal(config.state_dir / "gateway.sqlite")
        self.futures = FutureStore(private_roots=(config.state_dir, model_dir), journal=self.journal)
        self.sessions = SessionRegistry(self.journal)
        self.durable = DurableStates(self.journal, config.durable_state_every_steps)
        self.checkpoints = CheckpointStore(config.state_dir)
        self.training_runs = TrainingRuns(config.state_dir)
        self.training = TrainingOps(self.checkpoints, bare_checkpoint_names=config.dialect == "fireworks")
        self.sampler_weights = SamplerWeights(self.sessions, self.checkpoints, snapshots, config.sampler_snapshots_kept)
        self.restarted: set[str] = set()
        """Request ids from before a restart that the restore ran again."""
        self.sampling = Sampling(
            config, model_dir, self.sessions, self.futures, self.checkpoints, router, sampling_only
        )

    def create_model_once(self, body: dict[str, Any], kind: str, request_id: str | None = None) -> dict[str, Any]:
        """Create a training model once per (session, model_seq_id); retries get its request id. `kind`:
        "create_model", or "load_weights" (from a saved state). A bad session_id / model_seq_id raises here
        (a 4xx); the rest of the body is checked by the work. `request_id`: the id it had before a restart."""
        envelope = parse(NewModel, body)
        session = self.sessions.get(envelope.session_id)
        model_id = f"{session.session_id}:train:{envelope.model_seq_id}"
        key = f"model:{envelope.model_seq_id}"
        if key not in session.requests:
            if kind == "create_model":
                work = functools.partial(self._new_model, body, session, model_id)
            else:
                work = functools.partial(self._model_from_state, body, session, model_id)
            session.requests[key] = self.futures.run(kind, work, request_id)
            if request_id is None:
                raw = json.dumps(body).encode()
                request = session.requests[key]
                self.journal.op_accepted(
                    OpRecord(request, session.session_id, envelope.model_seq_id, kind, None, "json", raw)
                )
        return {"request_id": session.requests[key], "model_id": model_id}

    def create_model(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.create_model_once(body, "create_model")

    def create_from_state(self, body: dict[str, Any]) -> dict[str, Any]:
        """load_weights with session_id + model_seq_id: a new training model initialised from a state."""
        return self.create_model_once(body, "load_weights")

    async def _new_model(self, body: dict[str, Any], session: Session, model_id: str) -> dict[str, Any]:
        settings = parse(ModelSettings, body)
        lora = lora_from_body(settings.lora_config, self.config.lora_max_rank)
        _check_optimizer(settings.optimizer_config)
        base_model = self.config.check_base_model(settings.base_model, self.model_dir)
        seed = (settings.lora_config.seed if settings.lora_config else None) or 0
        model = await self._open_model(session, model_id, base_model, seed, settings.user_metadata, lora)
        self.durable.record(model)
        return {"model_id": model_id, "type": "create_model"}

    async def _model_from_state(self, body: dict[str, Any], session: Session, model_id: str) -> dict[str, Any]:
        settings = parse(ModelSettings, body)
        if not settings.path:
            raise InvalidArgument("the request needs 'path': a tinker://…/weights/… path or a checkpoint name")
        record = self.checkpoints.get(self.checkpoints.resolve_state(settings.path, None))
        _check_optimizer(settings.optimizer_config)
        base_model = self.config.check_base_model(settings.base_model or record.base_model, self.model_dir)
        lora = lora_of_checkpoint(Path(record.local_path))  # a LoRA state loads into a LoRA session like it
        if lora is not None and not self.config.lora_max_rank:
            raise InvalidArgument(f"{settings.path} is a LoRA state; this server trains full-parameter models only")
        model = await self._open_model(session, model_id, base_model, 0, settings.user_metadata, lora)
        try:
            answer = await self.training.load_state(model, record.path, settings.optimizer)
        except BaseException:
            session.models.pop(model_id, None)
            await model.executor.close("the load failed")
            with contextlib.suppress(Exception):
                await model.learner.close()
            raise
        model.initial_state = {"path": record.local_path, "optimizer": settings.optimizer}
        self.durable.record(model)
        return answer

    async def _open_model(
        self,
        session: Session,
        model_id: str,
        base_model: str,
        seed: int,
        user_metadata: dict | None,
        lora: dict | None = None,
    ) -> TrainingModel:
        learner = await LearnerSession.create(
            self.learner_channel, self.learner_base_model, seed=seed, **session_fields(lora)
        )
        executor = OrderedExecutor(self.futures, self.config.sequence_gap_timeout_s)
        model = TrainingModel(
            model_id, base_model, learner, executor, dict(user_metadata or {}), owner=session.owner, seed=seed,
            lora=lora,
        )  # fmt: skip
        session.models[model_id] = model
        self.training_runs.add(model_id, base_model, model.user_metadata, session.owner, lora)
        return model

    async def unload_model(self, model_id: str) -> dict[str, Any]:
        model = self.sessions.model(model_id)
        session = self.sessions.get(model_id.split(":", 1)[0])
        session.models.pop(model_id, None)
        self.journal.forget_model(model_id)
        await model.executor.close("the model was unloaded")
        await model.learner.close()
        return {"model_id": model_id, "type": "unload_model"}

    def get_info(self, model_id: str) -> dict[str, Any]:
        model = self.sessions.model(model_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_name": model.base_model,
            **tinker_fields(model.lora),
            "optimizer_config": {"type": "adamw"},
            "model_data": {"arch": "llama", "model_name": model.base_model, "tokenizer_id": model.base_model},
        }

    def submit(self, operation: Operation, fingerprint: bytes) -> dict[str, Any]:
        """Queue `operation` on its training client (exactly once, in seq_id order), journalled first."""
        model = self.sessions.model(operation.model_id)
        model.last_request_time = utc_now()
        retry = model.executor.knows(operation.seq_id)
        work = functools.partial(self.run_operation, model, operation)
        request_id = model.executor.submit(operation.seq_id, fingerprint, operation.kind, work)
        if not retry:
            self.journal.op_accepted(
                OpRecord(
                    request_id=request_id,
                    target=model.model_id,
                    seq_id=operation.seq_id,
                    kind=operation.kind,
                    fingerprint=fingerprint,
                    codec=operation.codec,
                    body=operation.body,
                )
            )
        return {"request_id": request_id, "model_id": operation.model_id}

    async def run_operation(self, model: TrainingModel, operation: Operation) -> Any:
        """Run `operation` on `model`, then keep what a restart needs (a durable state after a step)."""
        result = await work_of(operation, self.training, self.sampler_weights)(model)
        failpoint(f"gateway.{operation.kind}")
        if operation.kind == "optim_step":
            try:
                await self.durable.after_step(model, operation.seq_id)
            except Exception as exc:  # the step happened; only its durability is lost, and said so
                log.warning("%s: no durable state after seq_id %d: %s", model.model_id, operation.seq_id, exc)
        elif operation.kind == "save_weights_for_sampler":
            self.durable.record(model)
        return result

    async def restore(self) -> RestoreSummary:
        """Bring back the journal's sessions, clients and futures (coordinator.gateway.restore)."""
        return await restore_service(self)

    async def suspend(self, reason: str) -> None:
        """The server stops: what is unfinished is left for a restart to run, not recorded as failed."""
        self.futures.journal = None
        await self.sessions.suspend_all(reason)

    def training_run(self, run_id: str) -> dict[str, Any]:
        live = None
        with contextlib.suppress(NotFound):
            live = self.sessions.model(run_id)
        return self.training_runs.describe(run_id, self.checkpoints, live)


def _check_optimizer(optimizer: OptimizerConfig | None) -> None:
    if optimizer and optimizer.type != "adamw":
        raise InvalidArgument(f"optimizer {optimizer.type!r} is not available; use AdamOptimizerConfig")
