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
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from coordinator.client.learner_api import LearnerSession
from coordinator.gateway.bodies import ModelSettings, NewModel, OptimizerConfig, parse
from coordinator.gateway.checkpoints import CheckpointStore, utc_now
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.futures import FutureStore
from coordinator.gateway.sampler_weights import SamplerWeights
from coordinator.gateway.sampling import Sampling
from coordinator.gateway.sequencer import OrderedExecutor
from coordinator.gateway.sessions import Session, SessionRegistry, TrainingModel
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.gateway.training import TrainingOps
from coordinator.gateway.training_runs import TrainingRuns
from protos.errors import InvalidArgument, NotFound

MakeWork = Callable[[Session, str], Callable[[], Awaitable[dict[str, Any]]]]


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
    ) -> None:
        self.config = config
        self.learner_channel = learner_channel
        self.learner_base_model = learner_base_model
        """The model name the learner knows (its directory when this process started it)."""
        self.model_dir = model_dir
        self.router = router
        self.futures = FutureStore(private_roots=(config.state_dir, model_dir))
        self.sessions = SessionRegistry()
        self.checkpoints = CheckpointStore(config.state_dir)
        self.training_runs = TrainingRuns(config.state_dir)
        self.training = TrainingOps(self.checkpoints, bare_checkpoint_names=config.dialect == "fireworks")
        self.sampler_weights = SamplerWeights(self.sessions, self.checkpoints, snapshots, config.sampler_snapshots_kept)
        self.sampling = Sampling(config, model_dir, self.sessions, self.futures, self.checkpoints, router)

    def _create_model_once(self, body: dict[str, Any], kind: str, make_work: MakeWork) -> dict[str, Any]:
        """Start `make_work(session, model_id)` once per (session, model_seq_id); retries get its request id.
        A bad session_id / model_seq_id raises here (a 4xx); the rest of the body is checked by the work."""
        envelope = parse(NewModel, body)
        session = self.sessions.get(envelope.session_id)
        model_id = f"{session.session_id}:train:{envelope.model_seq_id}"
        key = f"model:{envelope.model_seq_id}"
        if key not in session.requests:
            session.requests[key] = self.futures.run(kind, make_work(session, model_id))
        return {"request_id": session.requests[key], "model_id": model_id}

    def create_model(self, body: dict[str, Any]) -> dict[str, Any]:
        def make_work(session: Session, model_id: str):
            async def work() -> dict[str, Any]:
                settings = parse(ModelSettings, body)
                rank = settings.lora_config.rank if settings.lora_config else 0
                if rank:
                    raise InvalidArgument(
                        f"LoRA rank {rank} requested, but Anvil trains full-parameter models only (lora_rank = 0): "
                        "service-mode trainers are full-parameter only. Pass rank=0."
                    )
                _check_optimizer(settings.optimizer_config)
                base_model = self.config.check_base_model(settings.base_model, self.model_dir)
                seed = (settings.lora_config.seed if settings.lora_config else None) or 0
                await self._open_model(session, model_id, base_model, seed, settings.user_metadata)
                return {"model_id": model_id, "type": "create_model"}

            return work

        return self._create_model_once(body, "create_model", make_work)

    def create_from_state(self, body: dict[str, Any]) -> dict[str, Any]:
        """load_weights with session_id + model_seq_id: a new training model initialised from a state."""

        def make_work(session: Session, model_id: str):
            async def work() -> dict[str, Any]:
                settings = parse(ModelSettings, body)
                if not settings.path:
                    raise InvalidArgument("the request needs 'path': a tinker://…/weights/… path or a checkpoint name")
                record = self.checkpoints.get(self.checkpoints.resolve_state(settings.path, None))
                _check_optimizer(settings.optimizer_config)
                base_model = self.config.check_base_model(settings.base_model or record.base_model, self.model_dir)
                model = await self._open_model(session, model_id, base_model, 0, settings.user_metadata)
                try:
                    return await self.training.load_state(model, record.path, settings.optimizer)
                except BaseException:
                    session.models.pop(model_id, None)
                    await model.executor.close("the load failed")
                    with contextlib.suppress(Exception):
                        await model.learner.close()
                    raise

            return work

        return self._create_model_once(body, "load_weights", make_work)

    async def _open_model(
        self, session: Session, model_id: str, base_model: str, seed: int, user_metadata: dict | None
    ) -> TrainingModel:
        learner = await LearnerSession.create(self.learner_channel, self.learner_base_model, lora_rank=0, seed=seed)
        executor = OrderedExecutor(self.futures, self.config.sequence_gap_timeout_s)
        model = TrainingModel(model_id, base_model, learner, executor, dict(user_metadata or {}), owner=session.owner)
        session.models[model_id] = model
        self.training_runs.add(model_id, base_model, model.user_metadata, session.owner)
        return model

    async def unload_model(self, model_id: str) -> dict[str, Any]:
        model = self.sessions.model(model_id)
        session = self.sessions.get(model_id.split(":", 1)[0])
        session.models.pop(model_id, None)
        await model.executor.close("the model was unloaded")
        await model.learner.close()
        return {"model_id": model_id, "type": "unload_model"}

    def get_info(self, model_id: str) -> dict[str, Any]:
        model = self.sessions.model(model_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "model_name": model.base_model,
            "is_lora": False,
            "lora_rank": None,
            "optimizer_config": {"type": "adamw"},
            "model_data": {"arch": "llama", "model_name": model.base_model, "tokenizer_id": str(self.model_dir)},
        }

    def submit(self, model_id: str, seq_id: int, body: bytes, kind: str, work) -> dict[str, Any]:
        """Queue `work(model)` as request `seq_id` of training client `model_id` (exactly once, in order)."""
        model = self.sessions.model(model_id)
        model.last_request_time = utc_now()
        request_id = model.executor.submit(seq_id, fingerprint(body), kind, lambda: work(model))
        return {"request_id": request_id, "model_id": model_id}

    def training_run(self, run_id: str) -> dict[str, Any]:
        live = None
        with contextlib.suppress(NotFound):
            live = self.sessions.model(run_id)
        return self.training_runs.describe(run_id, self.checkpoints, live)


def _check_optimizer(optimizer: OptimizerConfig | None) -> None:
    if optimizer and optimizer.type != "adamw":
        raise InvalidArgument(f"optimizer {optimizer.type!r} is not available; use AdamOptimizerConfig")
