"""A training client's sequenced operations as data: what a request asked for, decodable again from the
journal's bytes, and the one place that turns it into the work its OrderedExecutor runs.

The routes build an `Operation` from the HTTP request; the gateway's restore builds the same one from the
journal (coordinator.gateway.journal) to replay or re-run it after a restart. Both get their work from
`work_of`, so a replayed request does exactly what the original did.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.gateway.bodies import Sequenced, json_object, parse
from coordinator.gateway.sampler_weights import SamplerWeights
from coordinator.gateway.sessions import TrainingModel
from coordinator.gateway.training import TrainingOps
from coordinator.gateway.wire import ForwardCall, forward_call_from_json, forward_call_from_proto
from protos.errors import InvalidArgument

PROTOBUF = "application/x-protobuf"
STATE_CHANGING = frozenset({"forward_backward", "optim_step", "load_weights"})
"""The operations that change a training model: a restore replays these (and only these) on its state."""
SEQUENCED_KINDS = frozenset(
    {"optim_step", "save_weights", "save_weights_for_sampler", "save_weights_external", "load_weights"}
)


@dataclass(frozen=True)
class Operation:
    kind: str
    model_id: str
    seq_id: int
    body: bytes
    """The request's body, decompressed."""
    codec: str = "json"
    """"json", or "proto" for a forward_backward in Tinker's protobuf."""
    call: ForwardCall | None = field(default=None, compare=False)
    """The decoded forward call (forward kinds), kept so the body is decoded once."""


def forward_operation(raw: bytes, content_type: str, content_encoding: str, forward_route: bool) -> Operation:
    """The operation of a `/forward` (`forward_route`) or `/forward_backward` request."""
    if content_encoding == "zstd":
        import zstandard

        try:
            raw = zstandard.ZstdDecompressor().decompress(raw)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"the body is not zstd-compressed as its Content-Encoding says ({exc})") from None
    codec = "proto" if content_type.startswith(PROTOBUF) and not forward_route else "json"
    call = _forward_call(raw, codec, forward_route)
    kind = "forward" if call.forward_only else "forward_backward"
    return Operation(kind, call.model_id, call.seq_id, raw, codec, call)


def sequenced_operation(kind: str, raw: bytes) -> Operation:
    """The operation of an optim_step, save_weights, save_weights_for_sampler, save_weights_external or
    load_weights request."""
    envelope = parse(Sequenced, json_object(raw))
    return Operation(kind, envelope.model_id, envelope.seq_id, raw)


def decoded(kind: str, raw: bytes, codec: str) -> Operation:
    """The operation a journal row holds (`kind`, its body and codec)."""
    if kind in SEQUENCED_KINDS:
        return sequenced_operation(kind, raw)
    call = _forward_call(raw, codec, forward_route=kind == "forward")
    return Operation(kind, call.model_id, call.seq_id, raw, codec, call)


def _forward_call(raw: bytes, codec: str, forward_route: bool) -> ForwardCall:
    if codec == "proto":
        return forward_call_from_proto(raw)
    return forward_call_from_json(json_object(raw), forward_only=forward_route)


def work_of(
    operation: Operation, training: TrainingOps, sampler_weights: SamplerWeights
) -> Callable[[TrainingModel], Awaitable[dict[str, Any] | Any]]:
    """What running `operation` on a training model does."""
    if operation.call is not None:
        call = operation.call
        return lambda model: training.forward(model, call)
    body = json_object(operation.body)
    if operation.kind == "optim_step":
        return lambda model: training.optim_step(model, body)
    if operation.kind == "save_weights":
        return lambda model: training.save_state(model, body)
    if operation.kind == "save_weights_external":
        return lambda model: training.save_external(model, body)
    if operation.kind == "load_weights":
        return lambda model: training.load(model, body)
    if operation.kind == "save_weights_for_sampler":
        return lambda model: sampler_weights.save(model, body, operation.seq_id)
    raise InvalidArgument(f"unknown operation {operation.kind!r}")
