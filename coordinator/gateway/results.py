"""Results of futures that the poll encodes as protobuf or JSON, depending on what the client accepts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.gateway import wire
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

    def proto(self) -> bytes:
        return wire.sample_output_proto(self.reply, self.prompt_logprobs)

    def json(self) -> dict[str, Any]:
        return wire.sample_output_json(self.reply, self.prompt_logprobs)
