"""LearnerServicer: anvil.v1.LearnerService over the session registry and a backend.

The wire stops here: requests are turned into domain objects (TrainingBatch, AdamParams, paths),
validated completely, and only then handed to the backend, in a worker thread so the event loop keeps
answering health checks and queueing requests. Training requests go through the session's Sequencer
(servicekit.sequencer: seq_id order, retries answered from cache). Every rejection raises a
protos.errors exception, which protos.rpc maps to a status; a rejected request changes no model or
optimizer state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from learner.batch import batch_from_arrow
from learner.checkpoint import check_name, verify_checkpoint, write_checkpoint
from learner.config import LearnerConfig
from learner.losses import resolve_loss
from learner.session import SessionRegistry, TrainingSession
from learner.transports import PublishContext, make_transport, raise_first_failure
from protos.adam import adam_params_from_proto
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.arrow_schemas import encode_outputs
from protos.batch_request import BatchRequest, as_batch_request
from protos.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from servicekit.failpoints import failpoint
from servicekit.sequencer import request_fingerprint

LOSS_OUTPUT_TYPE = "ArrayRecord"
CLIENT_STATE_FILE = "client_state.bin"


class LearnerServicer(learner_pb2_grpc.LearnerServiceServicer):
    def __init__(self, config: LearnerConfig) -> None:
        self.config = config
        self.sessions = SessionRegistry(config)

    # --- sessions --------------------------------------------------------------------------------

    async def CreateSession(self, request, context):
        session = await self.sessions.create(request.base_model, request.lora_rank, request.seed, request.lora)
        return learner_pb2.CreateSessionResponse(session_id=session.session_id, info=_model_info(session))

    async def CloseSession(self, request, context):
        await self.sessions.close(request.session_id)
        return learner_pb2.CloseSessionResponse()

    async def GetInfo(self, request, context):
        return learner_pb2.LearnerServiceGetInfoResponse(info=_model_info(self.sessions.get(request.session_id)))

    # --- sequenced training requests -------------------------------------------------------------

    async def _sequenced(
        self, request: Any, execute: Callable[[TrainingSession], Awaitable[Any]], fingerprint: bytes | None = None
    ) -> Any:
        session = self.sessions.get(request.session_id)
        fingerprint = request_fingerprint(request) if fingerprint is None else fingerprint
        return await session.sequencer.run(request.seq_id, fingerprint, lambda: execute(session))

    async def Forward(self, request, context):
        batched = as_batch_request(request)  # over gRPC: already one (learner.server registers the parser)
        return await self._sequenced(
            batched, lambda s: self._forward(s, batched, backward=False), batched.fingerprint()
        )

    async def ForwardBackward(self, request, context):
        batched = as_batch_request(request)
        return await self._sequenced(batched, lambda s: self._forward(s, batched, backward=True), batched.fingerprint())

    async def _forward(self, session: TrainingSession, request: BatchRequest, backward: bool) -> Any:
        description = session.backend.description
        batch = batch_from_arrow(request.arrow_ipc_stream, vocab_size=description.vocab_size)
        if len(batch.data) > self.config.max_batch_rows:
            raise InvalidArgument(
                f"the batch has {len(batch.data)} rows; this learner takes at most {self.config.max_batch_rows} per "
                "request (learner max_batch_rows): split it into several requests"
            )
        longest = max(len(datum.model_input) for datum in batch.data)
        if description.max_context_length and longest > description.max_context_length:
            raise InvalidArgument(
                f"a datum has {longest} input tokens but the model's context is {description.max_context_length}; "
                "truncate it"
            )
        loss, loss_config = resolve_loss(
            request.loss_fn, batch.input_names, dict(request.loss_fn_config), batch.multi_target
        )
        result = await asyncio.to_thread(session.backend.forward, batch, loss, loss_config, backward)
        if backward:
            failpoint("learner.forward_backward")
        response_type = learner_pb2.ForwardBackwardResponse if backward else learner_pb2.ForwardResponse
        return response_type(
            outputs=common_pb2.DataBatch(arrow_ipc_stream=encode_outputs(result.logprobs)),
            metrics=result.metrics,
            loss_fn_output_type=LOSS_OUTPUT_TYPE,
        )

    async def OptimStep(self, request, context):
        async def execute(session: TrainingSession) -> Any:
            params = adam_params_from_proto(
                request.adam_params if request.HasField("adam_params") else None,
                request.grad_scale if request.HasField("grad_scale") else None,
            )
            metrics = await asyncio.to_thread(session.backend.optim_step, params)
            failpoint("learner.optim_step")
            return learner_pb2.OptimStepResponse(step=session.backend.step, metrics=metrics)

        return await self._sequenced(request, execute)

    async def SaveState(self, request, context):
        async def execute(session: TrainingSession) -> Any:
            target = session.checkpoint_root / "state" / check_name(request.name)
            client_state = request.client_state
            await session.writes.settle(target if request.background else None)  # a plain save: all complete
            session.writes.raise_failure()  # a background write that failed is reported here, once
            metadata = {"kind": "state", "step": session.backend.step, "base_model": session.base_model}
            snapshot = getattr(session.backend, "state_snapshot", None)
            background = request.background and snapshot is not None  # a backend without snapshots: sync
            if background:
                if target.exists() and not request.overwrite:  # found now: a background write reports late
                    raise AlreadyExists(f"checkpoint {target} already exists; choose another name or overwrite=true")
                write_state = await asyncio.to_thread(snapshot)
            else:
                write_state = session.backend.save_state

            def fill(directory: Path) -> None:
                write_state(directory)
                (directory / CLIENT_STATE_FILE).write_bytes(client_state)

            if background:
                session.writes.start(target, lambda: write_checkpoint(target, fill, request.overwrite, metadata))
            else:
                await asyncio.to_thread(write_checkpoint, target, fill, request.overwrite, metadata)
            return learner_pb2.SaveStateResponse(path=str(target), step=metadata["step"])

        return await self._sequenced(request, execute)

    async def LoadState(self, request, context):
        async def execute(session: TrainingSession) -> Any:
            if not request.path:
                raise InvalidArgument("path is empty; pass the path SaveState returned")
            path = Path(request.path)
            await session.writes.settle(path)  # one saved in the background is loaded once written
            metadata = await asyncio.to_thread(verify_checkpoint, path)
            if metadata.get("kind") != "state":
                raise FailedPrecondition(
                    f"{path} is a {metadata.get('kind')!r} checkpoint, not a training state; use a SaveState path"
                )
            await asyncio.to_thread(session.backend.load_state, path, request.with_optimizer)
            return learner_pb2.LoadStateResponse(
                step=session.backend.step, client_state=(path / CLIENT_STATE_FILE).read_bytes()
            )

        return await self._sequenced(request, execute)

    async def SaveWeights(self, request, context):
        async def execute(session: TrainingSession) -> Any:
            target = session.checkpoint_root / "weights" / check_name(request.name)
            metadata = {"kind": "weights", "step": session.backend.step, "base_model": session.base_model}
            await asyncio.to_thread(write_checkpoint, target, session.backend.save_weights, request.overwrite, metadata)
            return learner_pb2.SaveWeightsResponse(path=str(target), version=session.backend.step)

        return await self._sequenced(request, execute)

    async def PublishWeights(self, request, context):
        async def execute(session: TrainingSession) -> Any:
            targets = [target.address for target in request.targets]
            context = PublishContext(
                session.checkpoint_root / "weights",
                session.base_model,
                self.config.server.resolved_api_key(),
                request.target_timeout_s or None,
                session.published,
                request.rewind,
            )
            adapter = session.backend.description.lora_rank > 0
            transport = make_transport(request.transport, targets, context, adapter)
            version = request.version or session.backend.step
            start = time.perf_counter()
            results = await transport.publish(version, session.backend, targets)
            if not request.partial_ok:
                raise_first_failure(results)
            return learner_pb2.PublishWeightsResponse(
                version=version,
                num_bytes=max(r.num_bytes for r in results),
                duration_s=time.perf_counter() - start,
                targets=[
                    learner_pb2.PublishTargetResult(
                        address=r.address,
                        ok=r.error is None,
                        error=str(r.error or ""),
                        num_bytes=r.num_bytes,
                        relayed=r.relayed,
                    )
                    for r in results
                ],
                egress_bytes=sum(r.num_bytes for r in results),
                model_bytes=sum(t.numel() * t.element_size() for _, t in session.backend.named_weights()),
            )

        return await self._sequenced(request, execute)


def _model_info(session: TrainingSession) -> learner_pb2.ModelInfo:
    description = session.backend.description
    return learner_pb2.ModelInfo(
        base_model=session.base_model,
        model_path=str(description.model_path),
        tokenizer_path=str(description.model_path),
        num_parameters=description.num_parameters,
        vocab_size=description.vocab_size,
        max_context_length=description.max_context_length,
        step=session.backend.step,
        backend=description.backend,
        lora_rank=description.lora_rank,
    )
