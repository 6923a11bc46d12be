"""Results of futures that the poll encodes as protobuf or JSON, depending on what the client accepts, and
their exact JSON form for the gateway's journal (a result polled after a restart is the same result)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.gateway import prompt_scores, wire
from protos.anvil.v1 import rollout_pb2


@dataclass
class ForwardResult:
    logprobs: list[np.ndarray]
    shapes: list[tuple[int, ...]]
    metrics: dict[str, float]
    output_type: str

    def proto(self) -> bytes:
        return wire.forward_output_proto(self.logprobs, self.shapes, self.metrics, self.output_type)

    def json(self) -> dict[str, Any]:
        return wire.forward_output_json(self.logprobs, self.shapes, self.metrics, self.output_type)


@dataclass
class SampleResult:
    reply: rollout_pb2.SampleResponse
    prompt_logprobs: np.ndarray | None
    topk: dict[str, list] | None = None
    """Top-k prompt logprobs, `{"token_ids", "logprobs"}` [len(prompt), k] (coordinator.gateway.prompt_scores)."""
    targets: dict[str, Any] | None = None
    """Target prompt logprobs as TensorData JSON, in the request's layout."""

    def proto(self) -> bytes:
        message = wire.sample_output_message(self.reply, self.prompt_logprobs)
        prompt_scores.add_to_proto(message, self.topk, self.targets)
        return message.SerializeToString()

    def json(self) -> dict[str, Any]:
        result = wire.sample_output_json(self.reply, self.prompt_logprobs)
        if self.topk is not None:
            result["topk_prompt_logprobs"] = prompt_scores.topk_json(self.topk)
        if self.targets is not None:
            result["target_prompt_logprobs"] = self.targets
        return result


def encode_value(value: Any) -> dict[str, Any]:
    """A future's value as JSON the journal keeps: arrays as their bytes (exact), replies as protobuf."""
    if isinstance(value, ForwardResult):
        arrays = [{"dtype": a.dtype.str, "shape": list(a.shape), "data": _b64(a.tobytes())} for a in value.logprobs]
        return {
            "forward": arrays,
            "shapes": [list(s) for s in value.shapes],
            "metrics": value.metrics,
            "output_type": value.output_type,
        }
    if isinstance(value, SampleResult):
        prompt = value.prompt_logprobs
        return {
            "sample": _b64(value.reply.SerializeToString()),
            "prompt_logprobs": None if prompt is None else {"dtype": prompt.dtype.str, "data": _b64(prompt.tobytes())},
            "topk": value.topk,
            "targets": value.targets,
        }
    return {"json": value}


def decode_value(doc: dict[str, Any]) -> Any:
    """The inverse of `encode_value`."""
    if "forward" in doc:
        logprobs = [
            np.frombuffer(base64.b64decode(a["data"]), dtype=a["dtype"]).reshape(a["shape"]).copy()
            for a in doc["forward"]
        ]
        return ForwardResult(logprobs, [tuple(s) for s in doc["shapes"]], doc["metrics"], doc["output_type"])
    if "sample" in doc:
        reply = rollout_pb2.SampleResponse.FromString(base64.b64decode(doc["sample"]))
        prompt = doc["prompt_logprobs"]
        array = None if prompt is None else np.frombuffer(base64.b64decode(prompt["data"]), dtype=prompt["dtype"])
        return SampleResult(reply, None if array is None else array.copy(), doc.get("topk"), doc.get("targets"))
    return doc["json"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
