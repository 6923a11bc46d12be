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
        self.futures = FutureStore()
        self.sessions = SessionRegistry()
        self.checkpoints = CheckpointStore(config.state_dir)
        self.training_runs = TrainingRuns(config.state_dir)
        self.training = TrainingOps(self.checkpoints, bare_checkpoint_names=config.dialect == "fireworks")
        self.sampler_weights = SamplerWeights(self.sessions, self.checkpoints, snapshots, config.sampler_snapshots_kept)
        self.sampling = Sampling(config, model_dir, self.sessions, self.futures, self.checkpoints, router)

    def _create_model_once(self, body: dict[str, Any], kind: str, make_work: MakeWork) -> dict[str, Any]:
        """Start `make_work(session, model_id)` once per (session, model_seq_id); retries get its request id."""
        session = self.sessions.get(body["session_id"])
        model_id = f"{session.session_id}:train:{int(body['model_seq_id'])}"
        key = f"model:{body['model_seq_id']}"
        if key not in session.requests:
            session.requests[key] = self.futures.run(kind, make_work(session, model_id))
        return {"request_id": session.requests[key], "model_id": model_id}

    def create_model(self, body: dict[str, Any]) -> dict[str, Any]:
        def make_work(session: Session, model_id: str):
            async def work() -> dict[str, Any]:
                rank = (body.get("lora_config") or {}).get("rank", 0)
                if rank:
                    raise InvalidArgument(
                        f"LoRA rank {rank} requested, but Anvil trains full-parameter models only (lora_rank = 0): "
                        "service-mode trainers are full-parameter only. Pass rank=0."
                    )
                _check_optimizer(body.get("optimizer_config"))
                base_model = self.config.check_base_model(body.get("base_model"), self.model_dir)
                seed = (body.get("lora_config") or {}).get("seed") or 0
                await self._open_model(session, model_id, base_model, seed, body.get("user_metadata"))
                return {"model_id": model_id, "type": "create_model"}

            return work

        return self._create_model_once(body, "create_model", make_work)

    def create_from_state(self, body: dict[str, Any]) -> dict[str, Any]:
        """load_weights with session_id + model_seq_id: a new training model initialised from a state."""

        def make_work(session: Session, model_id: str):
            async def work() -> dict[str, Any]:
                record = self.checkpoints.get(self.checkpoints.resolve_state(str(body.get("path", "")), None))
                _check_optimizer(body.get("optimizer_config"))
                base_model = self.config.check_base_model(body.get("base_model") or record.base_model, self.model_dir)
                model = await self._open_model(session, model_id, base_model, 0, body.get("user_metadata"))
                try:
                    return await self.training.load_state(model, record.path, bool(body.get("optimizer")))
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
        model = TrainingModel(model_id, base_model, learner, executor, dict(user_metadata or {}))
        session.models[model_id] = model
        self.training_runs.add(model_id, base_model, model.user_metadata)
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


def _check_optimizer(optimizer: dict | None) -> None:
    if optimizer and optimizer.get("type", "adamw") != "adamw":
        raise InvalidArgument(f"optimizer {optimizer.get('type')!r} is not available; use AdamOptimizerConfig")
