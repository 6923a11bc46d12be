"""Bad input gets the right status and a message naming the fix; the model is unchanged and the next
valid request works."""

from __future__ import annotations

import math

import grpc
import pyarrow as pa
import pytest
import torch

from learner.server import start_learner
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.arrow_schemas import encode_batch
from protos.channels import open_channel
from protos.rpc import ServerConfig
from tests.learner.client import LearnerTestClient, batch_message, random_rows

VOCAB = 512


def good_row(n=4, **overrides):
    row = {"model_input": list(range(1, n + 1)), "target_tokens": list(range(2, n + 2)), "weights": [1.0] * n}
    row.update(overrides)
    return row


def raw_batch(table: pa.Table) -> common_pb2.DataBatch:
    return common_pb2.DataBatch(arrow_ipc_stream=encode_batch(table))


BAD_BATCHES = {
    "no rows": (raw_batch(pa.table({"model_input": pa.array([], pa.list_(pa.int32())),
                                     "target_tokens": pa.array([], pa.list_(pa.int32()))})), "no rows"),
    "not arrow": (common_pb2.DataBatch(arrow_ipc_stream=b"garbage"), "not a valid Arrow IPC stream"),
    "empty payload": (common_pb2.DataBatch(), "is empty"),
    "ragged weights": (batch_message([good_row(), good_row(weights=[1.0])]), "row 1: column 'weights' has 1 values"),
    "ragged targets": (batch_message([good_row(target_tokens=[1, 2])]), "row 0: column 'target_tokens' has 2"),
    "out of vocab": (batch_message([good_row(model_input=[1, 2, VOCAB, 3])]), f"token id {VOCAB}"),
    "negative token": (batch_message([good_row(target_tokens=[1, -1, 2, 3])]), "token id -1"),
    "nan weight": (batch_message([good_row(weights=[1.0, math.nan, 1.0, 1.0])]), "values must be finite"),
    "inf weight": (batch_message([good_row(weights=[1.0, math.inf, 1.0, 1.0])]), "values must be finite"),
    "unknown column": (
        raw_batch(pa.table({"model_input": pa.array([[1]], pa.list_(pa.int32())),
                            "target_tokens": pa.array([[2]], pa.list_(pa.int32())),
                            "mask": pa.array([[1]], pa.list_(pa.int32()))})),
        "unknown column(s) ['mask']",
    ),
    "wrong type": (
        raw_batch(pa.table({"model_input": pa.array([[1]], pa.list_(pa.int64())),
                            "target_tokens": pa.array([[2]], pa.list_(pa.int32()))})),
        "column 'model_input' has type",
    ),
    "empty model_input": (
        batch_message([good_row(model_input=[], target_tokens=[], weights=[])]),
        "model_input is empty",
    ),
    "too long": (batch_message([good_row(model_input=[1] * 600, target_tokens=[2] * 600, weights=[1.0] * 600)]),
                 "context is 512"),
}  # fmt: skip

BAD_LOSSES = {
    "unknown loss": ("nope", [good_row()], {}, "unknown loss_fn 'nope'"),
    "missing input": ("importance_sampling", [good_row()], {}, "needs batch column(s) ['advantages', 'logprobs']"),
    "extra input": (
        "cross_entropy",
        [good_row(advantages=[1.0] * 4)],
        {},
        "does not use batch column(s) ['advantages']",
    ),
    "unknown config": ("ppo", [{**good_row(), "weights": None}], {"clip": 0.1}, "no config key(s) ['clip']"),
    "bad clip range": ("ppo", [{**good_row(), "weights": None}], {"clip_low_threshold": 2.0}, "clip_low_threshold"),
    "k targets on rl loss": (
        "importance_sampling",
        [{"model_input": [1, 2], "target_tokens": [1, 2, 3, 4], "targets_per_position": 2,
          "logprobs": [0.0, 0.0], "advantages": [1.0, 1.0]}],
        {},
        "one target per position",
    ),
}  # fmt: skip


def rl_ready(rows):
    out = []
    for row in rows:
        row = {k: v for k, v in row.items() if v is not None}
        if "weights" not in row and "logprobs" not in row:
            n = len(row["model_input"])
            row.update(logprobs=[-1.0] * n, advantages=[1.0] * n)
        out.append(row)
    return out


async def assert_still_serving_and_unchanged(client, before):
    assert all(torch.equal(p, before[n]) for n, p in client.parameters_snapshot().items())
    assert all(g is None for g in client.gradients().values()), "a rejected request must not leave gradients"
    logprobs, metrics = await client.forward_backward([good_row()])
    assert "loss:sum" in metrics and len(logprobs) == 1


@pytest.mark.parametrize("case", list(BAD_BATCHES))
async def test_invalid_batches_are_rejected(client, case):
    batch, message = BAD_BATCHES[case]
    before = client.parameters_snapshot()
    request = learner_pb2.ForwardBackwardRequest(
        session_id=client.session_id, seq_id=client.take_seq_id(), batch=batch, loss_fn="cross_entropy"
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.ForwardBackward(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    await assert_still_serving_and_unchanged(client, before)


@pytest.mark.parametrize("case", list(BAD_LOSSES))
async def test_invalid_loss_requests_are_rejected(client, case):
    loss_fn, rows, config, message = BAD_LOSSES[case]
    before = client.parameters_snapshot()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.forward_backward(rl_ready(rows), loss_fn, config)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    await assert_still_serving_and_unchanged(client, before)


@pytest.mark.parametrize(
    ("adam", "field"),
    [({"learning_rate": -1.0}, "learning_rate"), ({"beta2": 1.5}, "beta2"), ({"grad_clip_norm": -1}, "grad_clip_norm")],
)
async def test_invalid_adam_params_are_rejected(client, adam, field):
    await client.forward_backward([good_row()])
    before, grads = client.parameters_snapshot(), client.gradients()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.optim_step(**adam)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"adam_params.{field}" in info.value.details()
    assert client.backend.step == 0
    assert all(torch.equal(p, before[n]) for n, p in client.parameters_snapshot().items())
    assert all(torch.equal(g, grads[n]) for n, g in client.gradients().items()), "gradients must survive"
    reply = await client.optim_step(learning_rate=1e-3)
    assert reply.step == 1


async def test_lora_rank_above_zero_is_rejected_with_the_fix(learner):
    servicer, address = learner
    async with open_channel(address) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model="anvil-tiny", lora_rank=32))
        # LoRA is opt-in (allow_lora, tests/learner/test_lora.py): without it the learner's state refuses it.
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "full parameters only" in info.value.details() and "set lora_rank to 0" in info.value.details()
        created = await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model="anvil-tiny"))
        assert created.info.lora_rank == 0
        assert created.info.num_parameters == sum(
            p.numel() for p in servicer.sessions.get(created.session_id).backend.model.parameters()
        )


async def test_unknown_session_and_model_are_not_found(learner, tmp_path):
    _, address = learner
    async with open_channel(address) as channel:
        stub = learner_pb2_grpc.LearnerServiceStub(channel)
        for call in (
            stub.GetInfo(learner_pb2.LearnerServiceGetInfoRequest(session_id="sess-missing")),
            stub.Forward(learner_pb2.ForwardRequest(session_id="sess-missing", seq_id=1)),
            stub.CloseSession(learner_pb2.CloseSessionRequest(session_id="sess-missing")),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "unknown session 'sess-missing'" in info.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=str(tmp_path / "no-model")))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_session_limit_and_close(learner_config):
    learner_config.max_sessions = 1
    running, servicer = await start_learner(learner_config)
    try:
        async with open_channel(running.address) as channel:
            first = await LearnerTestClient.create(channel, servicer)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await LearnerTestClient.create(channel, servicer)
            assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "max_sessions=1" in info.value.details()
            info_reply = await first.stub.GetInfo(learner_pb2.LearnerServiceGetInfoRequest(session_id=first.session_id))
            assert info_reply.info.vocab_size == VOCAB and info_reply.info.step == 0
            assert info_reply.info.tokenizer_path
            await first.stub.CloseSession(learner_pb2.CloseSessionRequest(session_id=first.session_id))
            await LearnerTestClient.create(channel, servicer)
    finally:
        await running.stop(0)


async def test_missing_api_key_is_unauthenticated(learner_config):
    learner_config.server = ServerConfig(api_key="secret")
    running, servicer = await start_learner(learner_config)
    try:
        async with open_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await LearnerTestClient.create(channel, servicer)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with open_channel(running.address, api_key="secret") as channel:
            client = await LearnerTestClient.create(channel, servicer)
            await client.forward_backward(random_rows(VOCAB))
    finally:
        await running.stop(0)
