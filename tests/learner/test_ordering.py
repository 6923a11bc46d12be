"""seq_id semantics on a real server: execution in order, retries answered once, gaps time out."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import torch

from learner.server import start_learner
from protos.anvil.v1 import learner_pb2
from protos.channels import open_channel
from tests.learner.client import LearnerTestClient, batch_message, random_rows


async def test_requests_sent_out_of_order_execute_in_order(client):
    """seq 3 (forward), seq 2 (optim_step), seq 1 (forward_backward) sent in reverse order: 1 runs first,
    so 2 steps on 1's gradients and 3 sees the stepped weights."""
    vocab = client.backend.description.vocab_size
    rows = random_rows(vocab)
    initial = client.parameters_snapshot()
    third = asyncio.ensure_future(client.forward(rows, seq_id=3))
    await asyncio.sleep(0.2)
    second = asyncio.ensure_future(client.optim_step(seq_id=2, learning_rate=0.05))
    await asyncio.sleep(0.2)
    assert not third.done() and not second.done(), "later seq_ids must wait for seq_id 1"
    assert all(torch.equal(p, initial[n]) for n, p in client.parameters_snapshot().items())
    first_lp, _ = await client.forward_backward(rows, seq_id=1)
    step = await second
    third_lp, _ = await third
    assert step.step == 1
    assert step.metrics["grad_norm:mean"] > 0, "the step saw seq 1's gradients"
    assert not np.allclose(first_lp[0], third_lp[0]), "seq 3 saw the stepped weights"


async def test_duplicate_request_returns_first_result_without_executing(client):
    vocab = client.backend.description.vocab_size
    rows = random_rows(vocab)
    first = await client.forward_backward(rows, seq_id=1)
    grads_once = client.gradients()
    retry = await client.forward_backward(rows, seq_id=1)
    for a, b in zip(first[0], retry[0], strict=True):
        np.testing.assert_array_equal(a, b)
    assert first[1] == retry[1]
    for name, grad in client.gradients().items():
        assert torch.equal(grad, grads_once[name]), "a retried forward_backward must not add gradients again"

    step = await client.optim_step(seq_id=2, learning_rate=1e-2)
    after_step = client.parameters_snapshot()
    again = await client.optim_step(seq_id=2, learning_rate=1e-2)
    assert again == step
    assert client.backend.step == 1, "a retried optim_step must never step twice"
    assert all(torch.equal(p, after_step[n]) for n, p in client.parameters_snapshot().items())


async def test_reusing_a_seq_id_for_a_different_request_is_invalid(client):
    vocab = client.backend.description.vocab_size
    await client.forward(random_rows(vocab, seed=1), seq_id=1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.forward(random_rows(vocab, seed=2), seq_id=1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already used for a different request" in info.value.details()


async def test_seq_id_must_be_positive(client):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.stub.Forward(learner_pb2.ForwardRequest(session_id=client.session_id, seq_id=0))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "seq_id must be >= 1" in info.value.details()


async def test_a_gap_that_never_fills_fails_clearly(learner_config):
    learner_config.sequence_gap_timeout_s = 0.5
    running, servicer = await start_learner(learner_config)
    try:
        async with open_channel(running.address) as channel:
            client = await LearnerTestClient.create(channel, servicer)
            vocab = client.backend.description.vocab_size
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await client.forward(random_rows(vocab), seq_id=2)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "waited 0.5s for seq_id 1" in info.value.details()
            # The session still works once the missing request arrives.
            await client.forward(random_rows(vocab), seq_id=1)
            await client.forward(random_rows(vocab), seq_id=2)
    finally:
        await running.stop(0)


async def test_a_rejected_request_consumes_its_seq_id(client):
    """Clients move on after an error (as Tinker's do), so the next seq_id must not wait forever."""
    bad = learner_pb2.ForwardRequest(
        session_id=client.session_id, seq_id=1, batch=batch_message(random_rows(10)), loss_fn="nope"
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await client.stub.Forward(bad)
    vocab = client.backend.description.vocab_size
    await asyncio.wait_for(client.forward(random_rows(vocab), seq_id=2), timeout=10)
