"""Tinker's public types, by Tinker's names, so a Tinker script needs only its import line changed.

`ModelInput.from_ints`, `TensorData`, `Datum`, `AdamParams`, `SamplingParams`, `SampledSequence`,
`SampleResponse`, `ForwardBackwardOutput`, `OptimStepResponse` and the checkpoint responses follow
tinker 0.38 (`tinker.types`). Only text chunks exist here (Anvil's built-in models are text-only).
Lists, numpy arrays and torch tensors are accepted wherever Tinker accepts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# One definition of Tinker's optimizer parameters (protos.adam), re-exported by Tinker's name.
from protos.adam import AdamParams as AdamParams

# Per-key dtypes Tinker uses when loss_fn_inputs arrive as plain lists.
_INPUT_DTYPES = {"target_tokens": "int64"}
_FLOAT_KEYS = {"weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold"}


@dataclass
class EncodedTextChunk:
    tokens: list[int]
    type: Literal["encoded_text"] = "encoded_text"

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class ModelInput:
    chunks: list[EncodedTextChunk]

    @classmethod
    def from_ints(cls, tokens: list[int]) -> ModelInput:
        return cls([EncodedTextChunk(list(map(int, tokens)))])

    @classmethod
    def empty(cls) -> ModelInput:
        return cls([])

    def to_ints(self) -> list[int]:
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: EncodedTextChunk) -> ModelInput:
        return ModelInput([*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        return self.append(EncodedTextChunk([int(token)]))


@dataclass
class TensorData:
    data: list[int] | list[float]
    dtype: Literal["int64", "float32"]
    shape: list[int] | None = None

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> TensorData:
        dtype = "int64" if np.issubdtype(array.dtype, np.integer) else "float32"
        return cls(array.reshape(-1).tolist(), dtype, list(array.shape))

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        return cls.from_numpy(tensor.detach().cpu().numpy())

    def to_numpy(self) -> np.ndarray:
        array = np.asarray(self.data, dtype=np.int64 if self.dtype == "int64" else np.float32)
        return array.reshape(self.shape) if self.shape is not None else array

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list:
        return self.to_numpy().tolist()


def as_tensor_data(key: str, value: Any) -> TensorData:
    """Tinker's auto-conversion of a loss_fn_inputs value (list, numpy array, torch tensor)."""
    if isinstance(value, TensorData):
        return value
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if key in _FLOAT_KEYS:
            value = value.astype(np.float32)
        return TensorData.from_numpy(value)
    dtype = _INPUT_DTYPES.get(key, "float32" if key in _FLOAT_KEYS else "int64")
    array = np.asarray(value, dtype=np.int64 if dtype == "int64" else np.float32)
    return TensorData(array.reshape(-1).tolist(), dtype, list(array.shape))


@dataclass
class Datum:
    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData]

    def __post_init__(self) -> None:
        self.loss_fn_inputs = {key: as_tensor_data(key, value) for key, value in self.loss_fn_inputs.items()}


@dataclass
class SamplingParams:
    """`stop`: None keeps EOS stopping; a str or list of str / list of int adds stops; [] disables all."""

    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[str] | list[int] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0


@dataclass
class SampledSequence:
    stop_reason: Literal["stop", "length"]
    tokens: list[int]
    logprobs: list[float] | None = None
    token_weight_versions: list[int] | None = None
    """Anvil extra: the weight version that produced each token (an in-flight update can split a sequence)."""
    routed_experts: np.ndarray | None = None
    """Anvil extra, when asked for: int32 [prompt + tokens - 1, moe_layers, top_k], the experts each position
    was routed to (routing replay; protos/moe_routing.py)."""


@dataclass
class SampleResponse:
    sequences: list[SampledSequence]
    prompt_logprobs: list[float | None] | None = None
    weight_version: int = 0
    """Anvil extra: the oldest weight version that produced any token of the sequences."""


@dataclass
class ForwardBackwardOutput:
    loss_fn_output_type: str
    loss_fn_outputs: list[dict[str, TensorData]]
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class OptimStepResponse:
    metrics: dict[str, float] | None = None


@dataclass
class SaveWeightsResponse:
    path: str


@dataclass
class SaveWeightsForSamplerResponse:
    path: str


@dataclass
class LoadWeightsResponse:
    path: str | None = None


@dataclass
class ModelData:
    arch: str
    model_name: str
    tokenizer_id: str


@dataclass
class GetInfoResponse:
    model_id: str
    model_data: ModelData
    is_lora: bool = False
    lora_rank: int | None = None
    model_name: str | None = None
