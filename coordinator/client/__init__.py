"""Anvil's Tinker-style Python client: `from coordinator.client import ServiceClient, types`.

A script written against Tinker's Python API needs only its import line changed (`import tinker` ->
`from coordinator import client as tinker`); training is full-parameter (lora_rank = 0).

Names are resolved on first use (PEP 562), so importing one submodule (`coordinator.client.types`, as the
rollout fleet does) does not import the whole client, which itself uses the fleet.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "APIFuture": "runtime",
    "SamplingClient": "sampling_client",
    "ServiceClient": "service_client",
    "TrainingClient": "training_client",
    **{
        name: "types"
        for name in (
            "AdamParams",
            "Datum",
            "EncodedTextChunk",
            "ForwardBackwardOutput",
            "ModelInput",
            "SampleResponse",
            "SampledSequence",
            "SamplingParams",
            "TensorData",
        )
    },
}

__all__ = [*sorted(_HOMES), "types"]


def __getattr__(name: str) -> Any:
    if name == "types":
        return importlib.import_module("coordinator.client.types")
    if name in _HOMES:
        return getattr(importlib.import_module(f"coordinator.client.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'coordinator.client' has no attribute {name!r}")
