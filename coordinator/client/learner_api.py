"""An async learner session over anvil.v1.LearnerService: seq_ids, Arrow conversion, domain errors.

Used by the Tinker-style TrainingClient and by the RL loop. Every training call takes the next seq_id
when it is made (not when it is sent), so calls issued concurrently still execute in call order on the
learner; a transport retry of the same call reuses its seq_id and is answered from the learner's cache.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np

from coordinator.client.convert import datum_row, output_from_logprobs
from coordinator.client.types import AdamParams, Datum, ForwardBackwardOutput
from protos.adam import adam_params_to_proto
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.arrow_schemas import decode_outputs, encode_batch, make_batch
from protos.status import call


class LearnerSession:
    def __init__(self, stub: learner_pb2_grpc.LearnerServiceStub, session_id: str, info: learner_pb2.ModelInfo) -> None:
        self.stub = stub
        self.session_id = session_id
        self.info = info
        self._seq_ids = itertools.count(1)

    @classmethod
    async def create(
        cls,
        channel: grpc.aio.Channel,
        base_model: str,
        lora_rank: int = 0,
        seed: int = 0,
        lora: learner_pb2.LoraOptions | None = None,
    ) -> LearnerSession:
        """A new session: full-parameter (lora_rank 0), or a LoRA adapter of `lora_rank` shaped by `lora`."""
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        request = learner_pb2.CreateSessionRequest(base_model=base_model, lora_rank=lora_rank, seed=seed, lora=lora)
        reply = await call(stub.CreateSession(request))
        return cls(stub, reply.session_id, reply.info)

    def next_seq_id(self) -> int:
        return next(self._seq_ids)

    async def forward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None, seq_id: int | None = None
    ) -> ForwardBackwardOutput:
        """`seq_id`: one reserved earlier with next_seq_id() (default: the next one, taken now)."""
        return await self._forward(data, loss_fn, loss_fn_config, False, seq_id)

    async def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None, seq_id: int | None = None
    ) -> ForwardBackwardOutput:
        return await self._forward(data, loss_fn, loss_fn_config, True, seq_id)

    async def _forward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None, backward: bool, seq_id: int | None
    ) -> ForwardBackwardOutput:
        seq_id = seq_id or self.next_seq_id()
        rows = [datum_row(datum, index) for index, datum in enumerate(data)]
        logprobs, metrics, output_type = await self.forward_rows(rows, loss_fn, loss_fn_config, backward, seq_id)
        return output_from_logprobs(data, logprobs, metrics, output_type)

    async def forward_rows(
        self, rows: list[dict], loss_fn: str, loss_fn_config: dict | None, backward: bool, seq_id: int | None = None
    ) -> tuple[list[np.ndarray], dict[str, float], str]:
        """Forward(Backward) of Arrow batch rows; per-row flat float32 logprobs, metrics, output type."""
        fields = {
            "session_id": self.session_id,
            "seq_id": seq_id or self.next_seq_id(),
            # A dict is built in place; a DataBatch message passed here would be copied (~2 ms per MiB).
            "batch": {"arrow_ipc_stream": encode_batch(make_batch(rows))},
            "loss_fn": loss_fn,
            "loss_fn_config": {k: float(v) for k, v in (loss_fn_config or {}).items()},
        }
        if backward:
            reply = await call(self.stub.ForwardBackward(learner_pb2.ForwardBackwardRequest(**fields)))
        else:
            reply = await call(self.stub.Forward(learner_pb2.ForwardRequest(**fields)))
        return decode_outputs(reply.outputs.arrow_ipc_stream), dict(reply.metrics), reply.loss_fn_output_type

    async def optim_step(self, adam_params: AdamParams | None = None) -> learner_pb2.OptimStepResponse:
        params = adam_params or AdamParams()
        request = learner_pb2.OptimStepRequest(
            session_id=self.session_id,
            seq_id=self.next_seq_id(),
            adam_params=adam_params_to_proto(params),
        )
        if params.grad_scale != 1.0:
            request.grad_scale = params.grad_scale
        return await call(self.stub.OptimStep(request))

    async def save_state(self, name: str, client_state: bytes = b"", overwrite: bool = False, background: bool = False):
        """SaveState; `background`: answer once the state is copied in memory, the files follow."""
        request = learner_pb2.SaveStateRequest(
            session_id=self.session_id,
            seq_id=self.next_seq_id(),
            name=name,
            client_state=client_state,
            overwrite=overwrite,
            background=background,
        )
        return await call(self.stub.SaveState(request))

    async def load_state(self, path: str, with_optimizer: bool = True):
        request = learner_pb2.LoadStateRequest(
            session_id=self.session_id, seq_id=self.next_seq_id(), path=path, with_optimizer=with_optimizer
        )
        return await call(self.stub.LoadState(request))

    async def save_weights(self, name: str, overwrite: bool = False):
        request = learner_pb2.SaveWeightsRequest(
            session_id=self.session_id, seq_id=self.next_seq_id(), name=name, overwrite=overwrite
        )
        return await call(self.stub.SaveWeights(request))

    async def publish_weights(
        self,
        targets: list[str],
        transport: str = "stream",
        version: int = 0,
        partial_ok: bool = False,
        target_timeout_s: float = 0.0,
        rewind: bool = False,
    ) -> learner_pb2.PublishWeightsResponse:
        """Publish as `version` (0: the learner's step). With `partial_ok`, a target that fails does not fail
        the call: the reply's `targets` say which ones took the version. `target_timeout_s` > 0 bounds how
        long each target may take. `rewind`: targets take the version even if they serve a newer one."""
        request = learner_pb2.PublishWeightsRequest(
            session_id=self.session_id,
            seq_id=self.next_seq_id(),
            targets=[common_pb2.WeightTarget(address=address) for address in targets],
            transport=transport,
            version=version,
            partial_ok=partial_ok,
            target_timeout_s=target_timeout_s,
            rewind=rewind,
        )
        return await call(self.stub.PublishWeights(request))

    async def get_info(self) -> learner_pb2.ModelInfo:
        reply = await call(self.stub.GetInfo(learner_pb2.LearnerServiceGetInfoRequest(session_id=self.session_id)))
        return reply.info

    async def close(self) -> None:
        await call(self.stub.CloseSession(learner_pb2.CloseSessionRequest(session_id=self.session_id)))
