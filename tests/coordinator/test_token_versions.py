"""Per-token weight versions from the wire to the trajectory batch, and the loop's per-token staleness."""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.client.convert import datum_row, sample_response_from_proto
from coordinator.client.types import SampledSequence
from coordinator.loop import oldest_token_version
from coordinator.objectives.maths import policy_datum
from protos.anvil.v1 import common_pb2, rollout_pb2
from protos.arrow_schemas import decode_batch, encode_batch, make_batch
from protos.batch_validation import validate_batch
from protos.errors import InvalidArgument


def test_sample_response_carries_each_tokens_version():
    reply = rollout_pb2.SampleResponse(
        sequences=[
            rollout_pb2.SampledSequence(
                tokens=[5, 6, 7],
                logprobs=[-1, -2, -3],
                stop_reason=common_pb2.STOP_REASON_LENGTH,
                token_weight_versions=[3, 3, 4],
            ),
            # a replica that labels no token: every token gets the response's version
            rollout_pb2.SampledSequence(tokens=[8, 9], logprobs=[-1, -1], stop_reason=common_pb2.STOP_REASON_STOP),
        ],
        weight_version=3,
    )
    response = sample_response_from_proto(reply, include_prompt_logprobs=False)
    assert response.sequences[0].token_weight_versions == [3, 3, 4]
    assert response.sequences[1].token_weight_versions == [3, 3]


def test_staleness_follows_the_oldest_token():
    sequences = [SampledSequence("length", [1, 2], [-1.0, -1.0], [5, 6]), SampledSequence("length", [3], [-1.0], [4])]
    assert oldest_token_version(sequences, default=6) == 4
    assert oldest_token_version([SampledSequence("stop", [], [], [])], default=6) == 6


def test_policy_datum_puts_the_versions_in_the_batch():
    prompt, completion = [1, 2, 3], [4, 5]
    datum = policy_datum(prompt, completion, [-0.5, -0.7], 1.0, [7, 8])
    table = validate_batch(decode_batch(encode_batch(make_batch([datum_row(datum)]))))
    # targets are tokens[1:]: two prompt positions (-1, not sampled), then one version per completion token
    assert table["sampler_versions"].to_pylist() == [[-1, -1, 7, 8]]
    assert str(table.schema.field("sampler_versions").type) == "list<item: int64>"
    assert "sampler_versions" not in policy_datum(prompt, completion, [-0.5, -0.7], 1.0).loss_fn_inputs


def test_a_ragged_versions_column_is_rejected():
    row = {"model_input": np.array([1, 2]), "target_tokens": np.array([2, 3]), "sampler_versions": np.array([1])}
    with pytest.raises(InvalidArgument, match="sampler_versions"):
        validate_batch(make_batch([row]))
