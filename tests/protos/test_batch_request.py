"""protos.batch_request: Forward/ForwardBackward requests decoded with the Arrow batch left in place."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from protos.anvil.v1 import common_pb2, learner_pb2
from protos.batch_request import as_batch_request, batch_request_parser
from protos.channels import open_channel
from protos.errors import InvalidArgument

ARROW = bytes(range(256)) * 64
"""Stands for an Arrow IPC stream: the parser never looks inside it."""


def request(arrow: bytes = ARROW, message_type=learner_pb2.ForwardBackwardRequest, **overrides):
    fields = {
        "session_id": "s-1",
        "seq_id": 7,
        "loss_fn": "ppo",
        "loss_fn_config": {"clip_low_threshold": 0.7, "clip_high_threshold": 1.3},
        "batch": common_pb2.DataBatch(arrow_ipc_stream=arrow),
    }
    return message_type(**{**fields, **overrides})


@pytest.mark.parametrize("message_type", [learner_pb2.ForwardRequest, learner_pb2.ForwardBackwardRequest])
def test_every_field_reads_as_protobuf_reads_it_and_the_batch_is_not_copied(message_type):
    wire = request(message_type=message_type).SerializeToString()
    parsed = batch_request_parser(message_type)(wire)
    expected = message_type.FromString(wire)
    assert (parsed.session_id, parsed.seq_id, parsed.loss_fn) == ("s-1", 7, "ppo")
    assert dict(parsed.loss_fn_config) == dict(expected.loss_fn_config)
    assert bytes(parsed.arrow_ipc_stream) == expected.batch.arrow_ipc_stream
    assert np.shares_memory(np.frombuffer(parsed.arrow_ipc_stream, np.uint8), np.frombuffer(wire, np.uint8))
    assert not parsed.message.HasField("batch"), "protobuf got everything but the batch"


def test_fields_in_any_order_and_repeated_batches_merge_as_protobuf_merges():
    """Concatenated messages are one message to protobuf: scalars and the batch's bytes, last one wins."""
    first = request(arrow=b"old", loss_fn="cross_entropy")
    batch_only = learner_pb2.ForwardBackwardRequest(batch=common_pb2.DataBatch(arrow_ipc_stream=b"new"))
    head_only = learner_pb2.ForwardBackwardRequest(seq_id=9, session_id="s-2")
    wire = batch_only.SerializeToString() + first.SerializeToString() + head_only.SerializeToString()
    newest = learner_pb2.ForwardBackwardRequest(batch=common_pb2.DataBatch(arrow_ipc_stream=b"newest"))
    wire += newest.SerializeToString()
    parsed = batch_request_parser(learner_pb2.ForwardBackwardRequest)(wire)
    expected = learner_pb2.ForwardBackwardRequest.FromString(wire)
    assert bytes(parsed.arrow_ipc_stream) == expected.batch.arrow_ipc_stream == b"newest"
    assert (parsed.seq_id, parsed.session_id, parsed.loss_fn) == (expected.seq_id, expected.session_id, "cross_entropy")


def test_the_fingerprint_is_the_same_received_or_built_here_and_changes_with_any_field():
    parse = batch_request_parser(learner_pb2.ForwardBackwardRequest)
    base = request()
    received = parse(base.SerializeToString()).fingerprint()
    assert received == as_batch_request(base).fingerprint()
    reordered = request(loss_fn_config={"clip_high_threshold": 1.3, "clip_low_threshold": 0.7})
    assert parse(reordered.SerializeToString()).fingerprint() == received, "map order is not content"
    changed = [
        request(arrow=ARROW[:-1] + b"\x00"),
        request(loss_fn="cispo"),
        request(loss_fn_config={"clip_low_threshold": 0.7, "clip_high_threshold": 1.31}),
        request(seq_id=8),
    ]
    assert len({parse(r.SerializeToString()).fingerprint() for r in changed} | {received}) == len(changed) + 1


@pytest.mark.parametrize(
    "wire",
    [b"\x1a\xff\xff\x03abc", b"\x12", b"\x1a\x03\x0a\x09abc", b"\x0f\x00"],
    ids=["batch-past-end", "truncated-varint", "arrow-past-batch", "wire-type-7"],
)
def test_malformed_bytes_are_invalid_argument_naming_the_message(wire):
    with pytest.raises(InvalidArgument, match="malformed ForwardBackwardRequest"):
        batch_request_parser(learner_pb2.ForwardBackwardRequest)(wire)


async def test_the_learner_answers_undecodable_bytes_with_invalid_argument_and_keeps_serving(client, learner):
    _, address = learner
    async with open_channel(address) as channel:
        call = channel.unary_unary("/anvil.v1.LearnerService/ForwardBackward", request_serializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(b"\x1a\xff\xff\x03abc")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed ForwardBackwardRequest" in caught.value.details()
    rows = [{"model_input": [1, 2, 3], "target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]}]
    logprobs, _ = await client.forward_backward(rows)
    assert len(logprobs[0]) == 3
