"""A thin test client over the learner stub: builds Arrow batches, numbers seq_ids, exposes the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import torch

from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.arrow_schemas import decode_outputs, encode_batch, make_batch


def batch_message(rows: Sequence[Mapping[str, Any]]) -> common_pb2.DataBatch:
    return common_pb2.DataBatch(arrow_ipc_stream=encode_batch(make_batch(rows)))


class LearnerTestClient:
    def __init__(self, stub: learner_pb2_grpc.LearnerServiceStub, servicer: Any, session_id: str) -> None:
        self.stub = stub
        self.servicer = servicer
        self.session_id = session_id
        self.next_seq_id = 1

    @classmethod
    async def create(cls, channel: grpc.aio.Channel, servicer: Any, base_model: str = "anvil-tiny"):
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        reply = await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=base_model, seed=0))
        return cls(stub, servicer, reply.session_id)

    @property
    def backend(self):
        return self.servicer.sessions.get(self.session_id).backend

    @property
    def model(self) -> torch.nn.Module:
        return self.backend.model

    def take_seq_id(self) -> int:
        self.next_seq_id += 1
        return self.next_seq_id - 1

    async def forward(self, rows, loss_fn="cross_entropy", config=None, backward=False, seq_id=None):
        request_type = learner_pb2.ForwardBackwardRequest if backward else learner_pb2.ForwardRequest
        request = request_type(
            session_id=self.session_id,
            seq_id=seq_id or self.take_seq_id(),
            batch=batch_message(rows),
            loss_fn=loss_fn,
            loss_fn_config=config or {},
        )
        call = self.stub.ForwardBackward if backward else self.stub.Forward
        reply = await call(request)
        return decode_outputs(reply.outputs.arrow_ipc_stream), dict(reply.metrics)

    async def forward_backward(self, rows, loss_fn="cross_entropy", config=None, seq_id=None):
        return await self.forward(rows, loss_fn, config, backward=True, seq_id=seq_id)

    async def optim_step(self, seq_id=None, grad_scale=None, **adam) -> learner_pb2.OptimStepResponse:
        request = learner_pb2.OptimStepRequest(
            session_id=self.session_id,
            seq_id=seq_id or self.take_seq_id(),
            adam_params=common_pb2.AdamParams(**adam),
            grad_scale=grad_scale,
        )
        return await self.stub.OptimStep(request)

    async def save_state(self, name: str, client_state: bytes = b"", overwrite: bool = False, background=False):
        return await self.stub.SaveState(
            learner_pb2.SaveStateRequest(
                session_id=self.session_id,
                seq_id=self.take_seq_id(),
                name=name,
                client_state=client_state,
                overwrite=overwrite,
                background=background,
            )
        )

    async def load_state(self, path: str, with_optimizer: bool = True):
        return await self.stub.LoadState(
            learner_pb2.LoadStateRequest(
                session_id=self.session_id, seq_id=self.take_seq_id(), path=path, with_optimizer=with_optimizer
            )
        )

    async def save_weights(self, name: str):
        return await self.stub.SaveWeights(
            learner_pb2.SaveWeightsRequest(session_id=self.session_id, seq_id=self.take_seq_id(), name=name)
        )

    async def publish(self, addresses: list[str], transport: str = "stream", **fields):
        """PublishWeights of the session's current weights to `addresses` (more request fields by name)."""
        return await self.stub.PublishWeights(
            learner_pb2.PublishWeightsRequest(
                session_id=self.session_id,
                seq_id=self.take_seq_id(),
                targets=[common_pb2.WeightTarget(address=address) for address in addresses],
                transport=transport,
                **fields,
            )
        )

    def parameters_snapshot(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.model.named_parameters()}

    def gradients(self) -> dict[str, torch.Tensor | None]:
        return {name: None if p.grad is None else p.grad.clone() for name, p in self.model.named_parameters()}


def random_rows(vocab_size: int, lengths=(5, 9, 7), seed: int = 0, inputs=("weights",)) -> list[dict]:
    """Datums of random tokens with the requested per-token loss inputs (random, any sign)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        tokens = rng.integers(0, vocab_size, size=n + 1)
        row: dict[str, Any] = {"model_input": tokens[:-1], "target_tokens": tokens[1:]}
        for name in inputs:
            if name == "weights":
                row[name] = rng.normal(size=n).astype(np.float32)
            elif name == "logprobs":
                row[name] = -rng.uniform(0.5, 8.0, size=n).astype(np.float32)
            elif name == "advantages":
                row[name] = rng.normal(size=n).astype(np.float32)
        rows.append(row)
    return rows
