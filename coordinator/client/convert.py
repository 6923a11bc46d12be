"""Tinker types <-> the anvil.v1 wire (Arrow batches and protos): the only place that knows both."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import numpy as np

from coordinator.client.types import (
    Datum,
    ForwardBackwardOutput,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)
from protos.anvil.v1 import common_pb2, rollout_pb2
from protos.datums import datum_row as protos_datum_row
from protos.errors import InvalidArgument

_STOP_REASONS = {common_pb2.STOP_REASON_STOP: "stop", common_pb2.STOP_REASON_LENGTH: "length"}


def datum_row(datum: Datum, index: int = 0) -> dict[str, Any]:
    """One Arrow row (protos.datums): [N, K] targets and their inputs flattened with targets_per_position.

    Tinker's types hold Python lists, so reading every element is the cost of this conversion: each list
    is packed by `struct` (about twice as fast as numpy's list conversion) straight into the Arrow column
    type (int32 ids, float32 inputs), so `make_batch` / `encode_rows` splice the arrays without a cast.
    """
    chunks = datum.model_input.chunks
    ids = chunks[0].tokens if len(chunks) == 1 else list(itertools.chain.from_iterable(c.tokens for c in chunks))
    tokens = _pack(ids, "i", np.int32)
    if tokens is None:  # ids beyond int32 or not ints: the general path words the error
        tokens = np.asarray(datum.model_input.to_ints(), dtype=np.int64)
    inputs = {key: _tensor_numpy(value) for key, value in datum.loss_fn_inputs.items()}
    return protos_datum_row(tokens, inputs, f"datum {index}")[0]


def _tensor_numpy(tensor: TensorData) -> np.ndarray:
    """`tensor.to_numpy()` with the values packed as int32 / float32 where they fit exactly."""
    values = tensor.data
    array = _pack(values, "i", np.int32) if tensor.dtype == "int64" else _pack(values, "f", np.float32)
    if array is None:
        return tensor.to_numpy()
    return array.reshape(tensor.shape) if tensor.shape is not None else array


def _pack(values: Any, code: str, dtype: type[np.generic]) -> np.ndarray | None:
    """A 1-D array of a list of Python numbers, or None where struct refuses one (out of range, wrong type):
    struct rounds floats to float32 as numpy does, and refuses ids that int32 cannot hold."""
    if not isinstance(values, list):
        return None
    try:
        return np.frombuffer(struct.pack(f"{len(values)}{code}", *values), dtype=dtype)
    except (struct.error, OverflowError, TypeError):
        return None


def output_from_logprobs(
    data: list[Datum], per_datum_logprobs: list[np.ndarray], metrics: dict[str, float], output_type: str
) -> ForwardBackwardOutput:
    """Per-datum logprobs shaped like each datum's target_tokens."""
    outputs = []
    for datum, logprobs in zip(data, per_datum_logprobs, strict=True):
        shape = datum.loss_fn_inputs["target_tokens"].to_numpy().shape
        outputs.append({"logprobs": TensorData.from_numpy(logprobs.reshape(shape))})
    return ForwardBackwardOutput(output_type, outputs, dict(metrics))


def sampling_params_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """Tinker's stop rules: None keeps EOS; [] disables every stop, EOS included."""
    message = common_pb2.SamplingParams(
        max_tokens=params.max_tokens or 0, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k
    )
    if params.seed is not None:
        message.seed = params.seed
    stop = params.stop
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        if not stops:
            message.ignore_eos = True
        elif all(isinstance(s, str) for s in stops):
            message.stop_strings.extend(stops)
        elif all(isinstance(s, int) for s in stops):
            message.stop_token_ids.extend(stops)
        else:
            raise InvalidArgument("SamplingParams.stop must be a str, a list of str, or a list of int")
    return message


def _routes(sequence: rollout_pb2.SampledSequence, reply: rollout_pb2.SampleResponse) -> np.ndarray | None:
    """A sequence's routed experts as [positions, moe_layers, top_k], None when the reply has none."""
    if not sequence.routed_experts:
        return None
    values = np.asarray(sequence.routed_experts, dtype=np.int32)
    return values.reshape(-1, reply.routed_moe_layers, reply.routed_top_k)


def sample_response_from_proto(reply: rollout_pb2.SampleResponse, include_prompt_logprobs: bool) -> SampleResponse:
    sequences = [
        SampledSequence(
            _STOP_REASONS[s.stop_reason],
            list(s.tokens),
            list(s.logprobs),
            list(s.token_weight_versions) or [reply.weight_version] * len(s.tokens),  # an older replica labels none
            _routes(s, reply),
        )
        for s in reply.sequences
    ]
    prompt_logprobs = [None, *reply.prompt_logprobs] if include_prompt_logprobs else None
    return SampleResponse(sequences, prompt_logprobs, reply.weight_version)
