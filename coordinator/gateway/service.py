"""TinkerService: the operations behind the REST routes, on Anvil's learner and rollout services.

Route handlers parse HTTP; this class owns the state (sessions, models, sampling sessions, futures,
checkpoint records) and turns each Tinker operation into learner/rollout calls. Training operations run
through the model's OrderedExecutor (seq_id order, exactly once); model and sampling-session creation
are deduplicated by their client-side sequence numbers, samples by (sampling session, seq_id).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from coordinator.client.learner_api import LearnerSession
from coordinator.gateway.checkpoints import CheckpointStore, parse_tinker_path
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.futures import FutureStore
from coordinator.gateway.results import ForwardResult, SampleResult
from coordinator.gateway.sequencer import OrderedExecutor
from coordinator.gateway.sessions import SamplingSession, Session, SessionRegistry, TrainingModel, utc_now
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.gateway.wire import ForwardCall, numeric_loss_config, prompt_logprobs_of
from protos.adam import WIRE_FIELDS, adam_params
from protos.anvil.v1 import common_pb2, rollout_pb2
from protos.errors import FailedPrecondition, InvalidArgument, NotFound
from protos.status import call

UNSUPPORTED_LOSSES = {
    "stable_reinforce": "loss_fn 'stable_reinforce' is Tinker's proprietary loss (its maths is unpublished) and "
    "Anvil does not implement it; use loss_fn='importance_sampling' (or ppo, cispo, gspo)",
    "custom": "server-side custom losses are off on this server; call forward_backward_custom, which runs "
    "your loss on the client",
}


def _token_weights(row: dict[str, Any]) -> np.ndarray:
    """The per-token weights that make a token count as a loss token (weights, else advantages)."""
    for key in ("weights", "advantages"):
        if key in row:
            return np.asarray(row[key])
    return np.ones(len(row["target_tokens"]))


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
        self.model_dir = model_dir
        self.router = router
        self.snapshots = snapshots
        """Where sampler snapshots go by identity (service-mode trainer jobs, for hot-load)."""
        self.futures = FutureStore()
        self.sessions = SessionRegistry()
        self.checkpoints = CheckpointStore(config.state_dir)
        self._runs_file = config.state_dir / "training_runs.jsonl"
        self.runs: dict[str, dict[str, Any]] = {}
        if self._runs_file.exists():
            for line in self._runs_file.read_text().splitlines():
                run = json.loads(line)
                self.runs[run["training_run_id"]] = run

    # --- sessions ----------------------------------------------------------------------------------

    async def expire_sessions_forever(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.config.session_timeout_s / 2))
            for session in self.sessions.expired(self.config.session_timeout_s):
                await self.finish_session(session, "expired: no heartbeat")

    async def finish_session(self, session: Session, reason: str) -> None:
        session.finished = True
        for model in session.models.values():
            await model.executor.close(f"the session {reason}")
            with contextlib.suppress(Exception):
                await model.learner.close()
            for snapshot in model.unnamed_snapshots:
                shutil.rmtree(snapshot, ignore_errors=True)
        session.models.clear()
        session.samplers.clear()

    def check_base_model(self, base_model: str | None) -> str:
        name = base_model or self.config.model
        if name.split(":")[0] not in {self.config.model, str(self.model_dir)}:
            raise InvalidArgument(f"base_model {name!r} is not served here; this server serves {self.config.model!r}")
        return self.config.model

    # --- training models -----------------------------------------------------------------------------

    def _create_model_once(self, body: dict[str, Any], kind: str, make_work) -> dict[str, Any]:
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
                self._check_optimizer(body.get("optimizer_config"))
                base_model = self.check_base_model(body.get("base_model"))
                seed = (body.get("lora_config") or {}).get("seed") or 0
                await self._open_model(session, model_id, base_model, seed, body.get("user_metadata"))
                return {"model_id": model_id, "type": "create_model"}

            return work

        return self._create_model_once(body, "create_model", make_work)

    @staticmethod
    def _check_optimizer(optimizer: dict | None) -> None:
        if optimizer and optimizer.get("type", "adamw") != "adamw":
            raise InvalidArgument(f"optimizer {optimizer.get('type')!r} is not available; use AdamOptimizerConfig")

    async def _open_model(
        self, session: Session, model_id: str, base_model: str, seed: int, user_metadata: dict | None
    ) -> TrainingModel:
        learner = await LearnerSession.create(self.learner_channel, self.learner_base_model, lora_rank=0, seed=seed)
        executor = OrderedExecutor(self.futures, self.config.sequence_gap_timeout_s)
        model = TrainingModel(model_id, base_model, learner, executor, dict(user_metadata or {}))
        model.fireworks = session.fireworks
        session.models[model_id] = model
        run = {"training_run_id": model_id, "base_model": base_model, "user_metadata": model.user_metadata}
        self.runs[model_id] = run
        with self._runs_file.open("a") as handle:
            handle.write(json.dumps(run) + "\n")
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
        model = self.sessions.model(model_id)
        model.last_request_time = utc_now()
        request_id = model.executor.submit(seq_id, fingerprint(body), kind, lambda: work(model))
        return {"request_id": request_id, "model_id": model_id}

    async def forward(self, model: TrainingModel, request: ForwardCall) -> ForwardResult:
        if request.loss_fn in UNSUPPORTED_LOSSES:
            raise InvalidArgument(UNSUPPORTED_LOSSES[request.loss_fn])
        rows, shapes = request.rows()
        config = numeric_loss_config(request.loss_fn_config)
        logprobs, metrics, output_type = await model.learner.forward_rows(
            rows, request.loss_fn, config, backward=not request.forward_only
        )
        if not request.forward_only:
            model.loss_sequences += len(rows)
            model.loss_tokens += sum(int(np.count_nonzero(_token_weights(row))) for row in rows)
        return ForwardResult(logprobs, shapes, metrics, output_type)

    async def optim_step(self, model: TrainingModel, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("optimizer_params"):
            raise InvalidArgument("only Adam is available; pass adam_params (AdamParams)")
        given = dict(body.get("adam_params") or {})
        given.pop("emit_grad_norm_metrics", None)  # Fireworks: grad_norm:mean is always reported
        unknown = sorted(set(given) - set(WIRE_FIELDS))
        if unknown:
            raise InvalidArgument(f"adam_params has unknown field(s) {unknown}; allowed: {sorted(WIRE_FIELDS)}")
        mode = body.get("grad_accumulation_normalization") or "none"
        counts = {"none": 0, "num_loss_tokens": model.loss_tokens, "num_sequences": model.loss_sequences}
        if mode not in counts:
            raise InvalidArgument(f"grad_accumulation_normalization {mode!r}; choose one of {sorted(counts)}")
        scale = 1.0 / counts[mode] if counts[mode] else 1.0
        reply = await model.learner.optim_step(adam_params(**given, grad_scale=scale))
        model.loss_tokens = model.loss_sequences = 0
        return {"metrics": dict(reply.metrics), "type": "optim_step"}

    async def save_state(self, model: TrainingModel, body: dict[str, Any]) -> dict[str, Any]:
        name = str(body.get("path") or "")
        reply = await model.learner.save_state(name, overwrite=bool(body.get("overwrite")))
        record = self.checkpoints.add(model.model_id, "weights", name, reply.path, model.base_model)
        return {"path": name if model.fireworks else record.path, "type": "save_weights"}

    async def save_weights_for_sampler(self, model: TrainingModel, body: dict[str, Any], seq_id: int) -> dict:
        name = body.get("path")
        if name and self.snapshots is not None:
            return await self._save_snapshot(model, str(name), body.get("checkpoint_type") or "base")
        if name:
            reply = await model.learner.save_weights(str(name))
            record = self.checkpoints.add(model.model_id, "sampler_weights", str(name), reply.path, model.base_model)
            return {"path": record.path, "type": "save_weights_for_sampler"}
        if body.get("sampling_session_seq_id") is None:
            raise InvalidArgument("save_weights_for_sampler needs a path (name) or a sampling_session_seq_id")
        session_id = model.model_id.split(":", 1)[0]
        sampler_id = f"{session_id}:sample:{int(body['sampling_session_seq_id'])}"
        reply = await model.learner.save_weights(f"snapshot-{seq_id}", overwrite=True)
        snapshot = Path(reply.path)
        model.unnamed_snapshots.append(snapshot)
        while len(model.unnamed_snapshots) > self.config.sampler_snapshots_kept:
            shutil.rmtree(model.unnamed_snapshots.popleft(), ignore_errors=True)
        session = self.sessions.get(session_id)
        session.samplers[sampler_id] = SamplingSession(sampler_id, model.base_model, snapshot)
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
            meta = await asyncio.to_thread(self.snapshots.add_base, identity, Path(reply.path))
        else:
            meta = await asyncio.to_thread(self.snapshots.add_delta, identity, Path(reply.path), model.last_snapshot)
        model.last_snapshot = identity
        return {"path": identity, "type": "save_weights_for_sampler", "checkpoint_type": meta["kind"]}

    def resolve_state_path(self, model: TrainingModel | None, path: str) -> str:
        """A tinker:// path as is; a bare name (Fireworks clients) is this model's or this server's state."""
        if path.startswith("tinker://"):
            return path
        if path.startswith("cross_job://"):
            raise InvalidArgument(f"{path}: cross-job checkpoint references are not supported; load by name")
        if model is not None:
            own = f"tinker://{model.model_id}/weights/{path}"
            if any(r.path == own for r in self.checkpoints.all()):
                return own
        named = [r for r in self.checkpoints.all() if r.kind == "weights" and r.name == path]
        if not named:
            raise NotFound(f"no checkpoint named {path!r}; list them with list_checkpoints")
        return named[-1].path

    def checkpoint_names(self) -> list[str]:
        return sorted({r.name for r in self.checkpoints.all() if r.kind == "weights"})

    async def load_state(self, model: TrainingModel, path: str, with_optimizer: bool) -> dict[str, Any]:
        path = self.resolve_state_path(model, path)
        record = self.checkpoints.get(path)
        if record.kind != "weights":
            raise InvalidArgument(
                f"{path} holds sampler weights only; load a training state saved by save_state (tinker://…/weights/…)"
            )
        await model.learner.load_state(record.local_path, with_optimizer=with_optimizer)
        model.loss_tokens = model.loss_sequences = 0
        return {"path": record.name if model.fireworks else path, "model_id": model.model_id, "type": "load_weights"}

    def create_from_state(self, body: dict[str, Any]) -> dict[str, Any]:
        """load_weights with session_id + model_seq_id: a new training model initialised from a state."""

        def make_work(session: Session, model_id: str):
            async def work() -> dict[str, Any]:
                record = self.checkpoints.get(self.resolve_state_path(None, str(body.get("path", ""))))
                self._check_optimizer(body.get("optimizer_config"))
                base_model = self.check_base_model(body.get("base_model") or record.base_model)
                model = await self._open_model(session, model_id, base_model, 0, body.get("user_metadata"))
                try:
                    return await self.load_state(model, record.path, bool(body.get("optimizer")))
                except BaseException:
                    session.models.pop(model_id, None)
                    await model.executor.close("the load failed")
                    with contextlib.suppress(Exception):
                        await model.learner.close()
                    raise

            return work

        return self._create_model_once(body, "load_weights", make_work)

    # --- sampling ------------------------------------------------------------------------------------

    def create_sampling_session(self, body: dict[str, Any]) -> dict[str, Any]:
        session = self.sessions.get(body["session_id"])
        sampler_id = f"{session.session_id}:sample:{int(body['sampling_session_seq_id'])}"
        if sampler_id not in session.samplers:
            if body.get("model_path"):
                record = self.checkpoints.get(body["model_path"])
                if record.kind != "sampler_weights":
                    raise FailedPrecondition(
                        f"{record.path} is a training state; sample from a save_weights_for_sampler path "
                        "(tinker://…/sampler_weights/…)"
                    )
                sampler = SamplingSession(sampler_id, record.base_model, Path(record.local_path), record.path)
            else:
                sampler = SamplingSession(sampler_id, self.check_base_model(body.get("base_model")), self.model_dir)
            session.samplers[sampler_id] = sampler
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    def get_sampler(self, sampler_id: str) -> dict[str, Any]:
        sampler = self.sessions.sampler(sampler_id)
        return {"sampler_id": sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}

    def asample(self, body: dict[str, Any]) -> dict[str, Any]:
        sampler_id = body.get("sampling_session_id")
        if not sampler_id:
            raise InvalidArgument("asample needs a sampling_session_id (create a sampling client first)")
        sampler = self.sessions.sampler(sampler_id)
        num_samples = int(body.get("num_samples", 1))
        seq_id = int(body.get("seq_id", 0))
        if seq_id not in sampler.requests:
            sampler.requests[seq_id] = self.futures.run("sample", lambda: self._sample(sampler, body))
        ids = [f"{sampler_id}:{seq_id}:{index}" for index in range(num_samples)]
        return {"request_id": sampler.requests[seq_id], "sample_sequence_ids": ids}

    async def _sample(self, sampler: SamplingSession, body: dict[str, Any]) -> SampleResult:
        for field, what in (
            ("topk_prompt_logprobs", "top-k prompt logprobs"),
            ("topk_sample_logprobs", "top-k sample logprobs"),
            ("prompt_alt_tokens_k", "prompt alternative tokens"),
        ):
            if body.get(field):
                raise InvalidArgument(f"{field} ({what}) is not supported by this server; leave it at 0")
        if body.get("target_prompt_logprobs"):
            raise InvalidArgument("target_prompt_logprobs is not supported by this server")
        prompt = []
        for chunk in (body.get("prompt") or {}).get("chunks") or []:
            if chunk.get("type", "encoded_text") != "encoded_text":
                raise InvalidArgument(f"prompt has a {chunk.get('type')!r} chunk; Anvil's models read text tokens")
            prompt.extend(int(t) for t in chunk.get("tokens") or [])
        if not prompt:
            raise InvalidArgument("the prompt is empty; send at least one token")
        num_samples = int(body.get("num_samples", 1))
        if num_samples < 1:
            raise InvalidArgument(f"num_samples is {num_samples}; it must be >= 1")
        params = self._sampling_params(body.get("sampling_params") or {}, len(prompt))
        want_prompt_logprobs = bool(body.get("prompt_logprobs"))
        request = rollout_pb2.SampleRequest(
            prompt_tokens=prompt,
            num_samples=num_samples,
            sampling_params=params,
            include_prompt_logprobs=want_prompt_logprobs,
        )
        if self.router is None:
            raise FailedPrecondition("this trainer has no sampler; sample from a deployment (hot-load a snapshot)")
        async with self.router.serving(sampler.snapshot) as stub:
            reply = await call(stub.Sample(request))
        prompt_logprobs = (
            prompt_logprobs_of(reply, len(prompt), body.get("prompt_logprobs_last_n")) if want_prompt_logprobs else None
        )
        return SampleResult(reply, prompt_logprobs)

    def _sampling_params(self, given: dict[str, Any], prompt_length: int) -> common_pb2.SamplingParams:
        from coordinator.client.convert import sampling_params_to_proto
        from coordinator.client.types import SamplingParams

        known = {"max_tokens", "seed", "stop", "temperature", "top_k", "top_p"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise InvalidArgument(f"sampling_params has unknown field(s) {unknown}; allowed: {sorted(known)}")
        params = SamplingParams(**{k: v for k, v in given.items() if v is not None or k == "stop"})
        if params.max_tokens is None:
            params.max_tokens = self.config.default_max_tokens
        return sampling_params_to_proto(params)

    # --- checkpoints and runs ------------------------------------------------------------------------

    def training_run(self, run_id: str) -> dict[str, Any]:
        run = self.runs.get(run_id)
        if run is None:
            raise NotFound(f"no training run {run_id!r}")
        checkpoints = self.checkpoints.of_run(run_id)
        last = {kind: [c for c in checkpoints if c.kind == kind] for kind in ("weights", "sampler_weights")}
        live = None
        with contextlib.suppress(NotFound):
            live = self.sessions.model(run_id)
        return {
            "training_run_id": run_id,
            "base_model": run["base_model"],
            "model_owner": "anvil",
            "is_lora": False,
            "corrupted": False,
            "lora_rank": None,
            "last_request_time": live.last_request_time
            if live
            else (checkpoints[-1].time if checkpoints else utc_now()),
            "last_checkpoint": last["weights"][-1].to_tinker() if last["weights"] else None,
            "last_sampler_checkpoint": last["sampler_weights"][-1].to_tinker() if last["sampler_weights"] else None,
            "user_metadata": run.get("user_metadata") or None,
        }

    def weights_info(self, path: str) -> dict[str, Any]:
        parse_tinker_path(path)
        record = self.checkpoints.get(path)
        return {
            "base_model": record.base_model,
            "is_lora": False,
            "lora_rank": None,
            "optimizer_config": {"type": "adamw"},
        }
