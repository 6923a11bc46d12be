"""Anvil's Tinker-style Python client: `from coordinator.client import ServiceClient, types`.

A script written against Tinker's Python API needs only its import line changed (`import tinker` ->
`from coordinator import client as tinker`); training is full-parameter (lora_rank = 0).
"""

from coordinator.client import types
from coordinator.client.runtime import APIFuture
from coordinator.client.sampling_client import SamplingClient
from coordinator.client.service_client import ServiceClient
from coordinator.client.training_client import TrainingClient
from coordinator.client.types import (
    AdamParams,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    ModelInput,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    TensorData,
)

__all__ = [
    "APIFuture",
    "AdamParams",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "ModelInput",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "ServiceClient",
    "TensorData",
    "TrainingClient",
    "types",
]
