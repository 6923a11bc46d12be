"""Tinker's wire formats <-> Anvil's batch rows and rollout results: the gateway's only codec.

In: the protobuf `ForwardBackwardRequest` the 0.38 SDK sends (dense or CSR tensors, int32 token bytes)
and the older JSON form (`forward_backward_input` / `forward_input`), both into the row dicts that
`protos.arrow_schemas.make_batch` takes. Out: `ForwardBackwardOutput` and `SampleResponse` as protobuf
(which the 0.38 SDK requires for those two result types) or as JSON (older clients).
Everything that can be wrong with a datum is an InvalidArgument naming the datum and the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.gateway.bodies import DatumJson, ForwardEnvelope, ForwardInput, parse
from protos.anvil.tinker.v1 import tinker_public_pb2 as tpb
from protos.anvil.v1 import common_pb2, rollout_pb2
from protos.datums import datum_row
from protos.errors import InvalidArgument

_PROTO_DTYPES = {
    tpb.DTYPE_FLOAT32: np.dtype(np.float32),
    tpb.DTYPE_INT64: np.dtype(np.int64),
    tpb.DTYPE_INT32: np.dtype(np.int32),
    tpb.DTYPE_BFLOAT16: np.dtype(np.uint16),
}
_JSON_DTYPES = {"float32": np.float32, "int64": np.int64}


@dataclass
class ForwardCall:
    """One forward / forward_backward chunk, decoded lazily: `rows()` raises for malformed data."""

    model_id: str
    seq_id: int
    loss_fn: str
    loss_fn_config: dict[str, float]
    forward_only: bool
    data: list[Any]
    """Protobuf `Datum`s or checked JSON datums (`DatumJson`)."""
    rejection: str | None = None
    """Why the request's input is malformed; raised by `rows()`, so inside the request's future."""

    def rows(self) -> tuple[list[dict[str, Any]], list[tuple[int, ...]]]:
        """Arrow rows and each datum's target shape ([N] or [N, K]), which the outputs take."""
        if self.rejection is not None:
            raise InvalidArgument(self.rejection)
        if not self.data:
            raise InvalidArgument("the request has no datums; send at least one Datum")
        decode = _proto_datum if self.data and isinstance(self.data[0], tpb.Datum) else _json_datum
        decoded = [decode(index, datum) for index, datum in enumerate(self.data)]
        return [row for row, _ in decoded], [shape for _, shape in decoded]


def forward_call_from_proto(body: bytes) -> ForwardCall:
    message = tpb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise InvalidArgument(f"the body is not a ForwardBackwardRequest protobuf ({exc})") from exc
    config: dict[str, Any] = dict(message.loss_fn_config)
    for key, value in message.loss_fn_config_v2.items():
        config[key] = value.number if value.WhichOneof("value") == "number" else value.text
    return ForwardCall(
        model_id=message.model_id,
        seq_id=message.seq_id,
        loss_fn=message.loss_fn,
        loss_fn_config=config,
        forward_only=message.forward_only,
        data=list(message.data),
    )


def forward_call_from_json(body: dict[str, Any], forward_only: bool) -> ForwardCall:
    """The Tinker <= 0.2x JSON body: {"forward_backward_input"|"forward_input": {...}, "model_id", "seq_id"}.

    A bad model_id / seq_id / input object raises here (a 400: the request cannot be queued); a bad field
    inside the input is kept as the call's `rejection`, which fails its future in seq_id order."""
    envelope = parse(ForwardEnvelope, body)
    key = "forward_input" if forward_only else "forward_backward_input"
    inner = (None if forward_only else envelope.forward_backward_input) or envelope.forward_input
    if inner is None:
        raise InvalidArgument(f"the JSON body needs an object {key!r} with data, loss_fn and loss_fn_config")
    call = ForwardCall(envelope.model_id, envelope.seq_id, "", {}, forward_only, [])
    try:
        checked = parse(ForwardInput, inner, where=key)
    except InvalidArgument as exc:
        call.rejection = str(exc)
        return call
    call.loss_fn, call.loss_fn_config, call.data = checked.loss_fn, dict(checked.loss_fn_config or {}), checked.data
    return call


def numeric_loss_config(config: dict[str, Any]) -> dict[str, float]:
    """The built-in losses take numbers only (a bool is a JSON true/false, not a number)."""
    numbers = {}
    for key, value in config.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidArgument(f"loss_fn_config[{key!r}] = {value!r}; the built-in losses take finite numbers")
        numbers[key] = float(value)
    return numbers


# --- datums -------------------------------------------------------------------------------------------


def _proto_tensor(tensor: tpb.Tensor, where: str) -> np.ndarray:
    dtype = _PROTO_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise InvalidArgument(f"{where}: unsupported dtype {tensor.dtype}; send float32 or int64")
    shape = list(tensor.shape)
    if tensor.WhichOneof("encoding") == "sparse_csr":
        if len(shape) != 2:
            raise InvalidArgument(f"{where}: a CSR tensor must be 2-D, got shape {shape}")
        csr = tensor.sparse_csr
        values = _frombuffer(csr.values, dtype, where)
        crow = _frombuffer(csr.crow_indices, np.dtype(np.int64), where)
        cols = _frombuffer(csr.col_indices, np.dtype(np.int64), where)
        if len(crow) != shape[0] + 1 or len(cols) != len(values) or (len(cols) and cols.max() >= shape[1]):
            raise InvalidArgument(f"{where}: CSR indices do not fit shape {shape}")
        dense = np.zeros(shape, dtype=dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, cols] = values
        array = dense
    else:
        array = _frombuffer(tensor.dense, dtype, where)
        if shape:
            if math.prod(shape) != array.size:
                raise InvalidArgument(f"{where}: {array.size} values do not fill shape {shape}")
            array = array.reshape(shape)
    if tensor.dtype == tpb.DTYPE_BFLOAT16:
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _frombuffer(data: bytes, dtype: np.dtype, where: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise InvalidArgument(f"{where}: {len(data)} bytes is not a whole number of {dtype} values")
    return np.frombuffer(data, dtype=dtype)


def _proto_datum(index: int, datum: tpb.Datum) -> tuple[dict[str, Any], tuple[int, ...]]:
    pieces = []
    for chunk in datum.model_input:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise InvalidArgument(f"datum {index}: model_input has a {kind!r} chunk; Anvil's models read text tokens")
        pieces.append(_frombuffer(chunk.encoded_text.tokens, np.dtype(np.int32), f"datum {index} model_input"))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    inputs = {
        key: _proto_tensor(value, f"datum {index} loss_fn_inputs[{key!r}]")
        for key, value in datum.loss_fn_inputs.items()
    }
    return datum_row(tokens, inputs, f"datum {index}")


def _json_datum(index: int, datum: DatumJson) -> tuple[dict[str, Any], tuple[int, ...]]:
    tokens: list[int] = []
    for chunk in datum.model_input.chunks:
        if chunk.type != "encoded_text":
            raise InvalidArgument(f"datum {index}: model_input has a {chunk.type!r} chunk; Anvil reads text")
        tokens.extend(chunk.tokens)
    inputs = {}
    for key, value in datum.loss_fn_inputs.items():
        where = f"datum {index} loss_fn_inputs[{key!r}]"
        if value.dtype not in _JSON_DTYPES:
            raise InvalidArgument(f"{where}: dtype {value.dtype!r}; send 'int64' or 'float32'")
        try:
            array = np.asarray(value.data, dtype=_JSON_DTYPES[value.dtype])
            inputs[key] = array.reshape(value.shape) if value.shape else array
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"{where}: {exc}") from exc
    return datum_row(np.asarray(tokens, dtype=np.int64), inputs, f"datum {index}")


# --- results ------------------------------------------------------------------------------------------


def forward_output_proto(
    logprobs: list[np.ndarray], shapes: list[tuple[int, ...]], metrics: dict[str, float], output_type: str
) -> bytes:
    """One ArrayRecord per run of datums with the same trailing shape (the SDK concatenates them)."""
    message = tpb.ForwardBackwardOutput(loss_fn_output_type=output_type, metrics=metrics)
    start = 0
    while start < len(shapes):
        trailing = shapes[start][1:]
        end = start
        while end < len(shapes) and shapes[end][1:] == trailing:
            end += 1
        parts = [np.ascontiguousarray(lp, dtype=np.float32).tobytes() for lp in logprobs[start:end]]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        record = message.loss_fn_outputs.add(type_tag=output_type, num_datums=end - start)
        record.fields["logprobs"].CopyFrom(
            tpb.BatchedTensor(
                data=b"".join(parts), offsets=offsets.tobytes(), dtype=tpb.DTYPE_FLOAT32, trailing_shape=trailing
            )
        )
        start = end
    return message.SerializeToString()


def forward_output_json(
    logprobs: list[np.ndarray], shapes: list[tuple[int, ...]], metrics: dict[str, float], output_type: str
) -> dict[str, Any]:
    outputs = [
        {"logprobs": {"data": lp.astype(float).tolist(), "dtype": "float32", "shape": list(shape)}}
        for lp, shape in zip(logprobs, shapes, strict=True)
    ]
    return {"loss_fn_output_type": output_type, "loss_fn_outputs": outputs, "metrics": metrics}


_STOP = {common_pb2.STOP_REASON_STOP: tpb.STOP_REASON_STOP, common_pb2.STOP_REASON_LENGTH: tpb.STOP_REASON_LENGTH}
_STOP_NAMES = {tpb.STOP_REASON_STOP: "stop", tpb.STOP_REASON_LENGTH: "length"}


def prompt_logprobs_of(reply: rollout_pb2.SampleResponse, prompt_length: int, last_n: int | None) -> np.ndarray:
    """float32[len(prompt)]: NaN at position 0 and, with `last_n`, before the last n positions."""
    values = np.full(prompt_length, np.nan, dtype=np.float32)
    values[1:] = np.asarray(reply.prompt_logprobs, dtype=np.float32)[: prompt_length - 1]
    if last_n is not None:
        values[: max(prompt_length - last_n, 0)] = np.nan
    return values


def sample_output_message(reply: rollout_pb2.SampleResponse, prompt_logprobs: np.ndarray | None) -> tpb.SampleResponse:
    message = tpb.SampleResponse()
    for sequence in reply.sequences:
        message.sequences.add(
            stop_reason=_STOP.get(sequence.stop_reason, tpb.STOP_REASON_LENGTH),
            tokens=np.asarray(sequence.tokens, dtype=np.int32).tobytes(),
            logprobs=np.asarray(sequence.logprobs, dtype=np.float32).tobytes(),
        )
    if prompt_logprobs is not None:
        message.prompt_logprobs = prompt_logprobs.tobytes()
    return message


def sample_output_json(reply: rollout_pb2.SampleResponse, prompt_logprobs: np.ndarray | None) -> dict[str, Any]:
    sequences = [
        {
            "stop_reason": _STOP_NAMES[_STOP.get(s.stop_reason, tpb.STOP_REASON_LENGTH)],
            "tokens": list(s.tokens),
            "logprobs": [float(x) for x in s.logprobs],
        }
        for s in reply.sequences
    ]
    result: dict[str, Any] = {"type": "sample", "sequences": sequences, "prompt_cache_hit_tokens": 0}
    if prompt_logprobs is not None:
        result["prompt_logprobs"] = [None if math.isnan(x) else float(x) for x in prompt_logprobs.tolist()]
    return result
