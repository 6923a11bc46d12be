"""The rollout engine interface: sample with per-token logprobs, score sequences, take new weights.

Engines know nothing of gRPC or of update transactions. The service validates requests before they
reach an engine (token ids in range, lengths within the context). rollout/weights.py calls `load_weights*`
only inside the engine's `swapping()` window, and, with `swap_mode = "drain"`, also only when no request
is in flight (its gate). An engine that supports in-flight swaps makes `swapping()` a token boundary:
running requests pause between two tokens, the weights and `weight_version` change, and they go on, each
token labelled with the version that produced it (GeneratedSequence.token_versions).
Logprobs are the model's raw log-softmax (temperature 1), like vLLM's default and the learner's.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """Resolved sampling settings (no unset fields)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    """-1 = off"""
    seed: int | None
    stop_strings: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool


@dataclass(frozen=True)
class GeneratedSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    token_versions: list[int] = field(default_factory=list)
    """Weight version that produced each token; empty from an engine that cannot swap in flight (the
    service then labels every token with the version served when the request started)."""


@dataclass(frozen=True)
class SampleResult:
    sequences: list[GeneratedSequence]
    prompt_logprobs: list[float] | None
    """Logprobs of prompt tokens 1..n-1, when asked for."""


@dataclass(frozen=True)
class EngineDescription:
    engine: str
    model_path: Path
    vocab_size: int
    max_context_length: int
    eos_token_id: int | None


class RolloutEngine(ABC):
    weight_version: int = 0
    """The version being served; only rollout/weights.py changes it, inside `swapping()`."""
    swap_mode: Literal["inflight", "drain"] = "drain"
    """"inflight" when `swapping()` is a token boundary that running requests survive; "drain" (the safe
    default for engines without one) makes the updater wait for running requests before a swap."""

    @contextlib.asynccontextmanager
    async def swapping(self) -> AsyncIterator[None]:
        """The window a swap runs in: no token is computed inside it, and tokens computed after it carry the
        `weight_version` set inside it. The default does nothing (the updater's drain makes it safe)."""
        yield

    @property
    @abstractmethod
    def description(self) -> EngineDescription: ...

    @abstractmethod
    async def sample(
        self, prompt_tokens: list[int], num_samples: int, spec: SamplingSpec, include_prompt_logprobs: bool
    ) -> SampleResult: ...

    @abstractmethod
    async def compute_logprobs(self, tokens: list[int]) -> list[float]:
        """Logprob of tokens[i] given tokens[:i], for i = 1..n-1."""

    @abstractmethod
    async def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the served weights with a full, already verified set (HF names)."""

    async def load_weights_from_directory(self, directory: Path) -> None:
        """Replace the served weights with a verified Hugging Face checkpoint directory's (by default: read
        its safetensors files and `load_weights`; engines that read files themselves override this)."""
        from safetensors.torch import load_file

        tensors: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.safetensors")):
            tensors.update(load_file(file))
        await self.load_weights(tensors)

    @abstractmethod
    async def close(self) -> None:
        """Release the engine (processes, memory)."""
