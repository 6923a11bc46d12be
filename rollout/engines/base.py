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
    return_routed_experts: bool = False
    """Also record the experts each position was routed to (routing replay; MoE models only)."""


@dataclass(frozen=True)
class GeneratedSequence:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: Literal["stop", "length"]
    token_versions: list[int] = field(default_factory=list)
    """Weight version that produced each token; empty from an engine that cannot swap in flight (the
    service then labels every token with the version served when the request started)."""
    routed_experts: torch.Tensor | None = None
    """With SamplingSpec.return_routed_experts: int32 [prompt + tokens - 1, moe_layers, top_k], the experts
    each position the model read was routed to (protos.moe_routing)."""


@dataclass(frozen=True)
class PromptScoring:
    """What a sample request also scores on its prompt, at positions 1..n-1 (each given its prefix)."""

    logprobs: bool = False
    """The prompt's own tokens' logprobs."""
    top_k: int = 0
    """The k most likely tokens at each position, and their logprobs."""
    targets: tuple[tuple[int, int], ...] = ()
    """(position, token) pairs to score, whatever the prompt's token there (distillation's targets)."""


@dataclass(frozen=True)
class SampleResult:
    sequences: list[GeneratedSequence]
    prompt_logprobs: list[float] | None
    """Logprobs of prompt tokens 1..n-1, when asked for."""
    prompt_topk: list[list[tuple[int, float]]] | None = None
    """With PromptScoring.top_k: per position 1..n-1, k (token, logprob) pairs, most likely first."""
    prompt_target_logprobs: list[float] | None = None
    """With PromptScoring.targets: one logprob per pair, in order."""
    routing_shape: tuple[int, int] = (0, 0)
    """With SamplingSpec.return_routed_experts: (moe_layers, top_k) of each sequence's routed_experts."""


def score_prompt(logprobs_LV: torch.Tensor, prompt: list[int], scoring: PromptScoring) -> dict:
    """SampleResult's prompt fields from the log-softmax at prompt positions 1..n-1 (row i: position i + 1)."""
    found: dict = {"prompt_logprobs": None}
    if scoring.logprobs:
        found["prompt_logprobs"] = logprobs_LV.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
    if scoring.top_k:
        values_LK, tokens_LK = torch.topk(logprobs_LV, scoring.top_k, dim=-1)
        found["prompt_topk"] = [
            list(zip(tokens, values, strict=True))
            for tokens, values in zip(tokens_LK.tolist(), values_LK.tolist(), strict=True)
        ]
    if scoring.targets:
        positions, tokens = zip(*scoring.targets, strict=True)
        found["prompt_target_logprobs"] = logprobs_LV[torch.tensor(positions) - 1, torch.tensor(tokens)].tolist()
    return found


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
    records_routes: bool = False
    """Whether `sample` can return the experts each position was routed to (SamplingSpec.return_routed_experts).
    vLLM can only on GPUs (its Model Runner V2 records them; it needs Triton), so only the torch engine does."""

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
        self, prompt_tokens: list[int], num_samples: int, spec: SamplingSpec, scoring: PromptScoring
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

    async def load_adapter(self, directory: Path, layers: dict[str, tuple[torch.Tensor, ...]]) -> None:
        """Serve the base model (the directory this replica started from) with a verified LoRA adapter
        (rollout/adapters.py). By default the adapter is merged into the base weights and loaded in full;
        engines with LoRA support of their own (vLLM) serve the adapter as it is."""
        from safetensors.torch import load_file

        from rollout.adapters import merged

        base: dict[str, torch.Tensor] = {}
        for file in sorted(self.description.model_path.glob("*.safetensors")):
            base.update(load_file(file))
        await self.load_weights(merged(base, layers))

    @abstractmethod
    async def close(self) -> None:
        """Release the engine (processes, memory)."""
