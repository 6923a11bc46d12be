"""The learner backend interface: what a model-and-optimizer holder must do, independent of sharding.

A backend owns one model (all parameters trainable, or a LoRA adapter's: torch backend only) and its
AdamW state. The service calls it from one request at a time per session (the sequencer guarantees
order), so implementations need no locking. Gradients accumulate across `forward_backward` calls until `optim_step`;
`forward` never touches them. Weights are named by their Hugging Face parameter names everywhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from learner.batch import TrainingBatch
from learner.losses import LossSpec
from protos.adam import AdamParams


@dataclass(frozen=True)
class ModelDescription:
    model_path: Path
    num_parameters: int
    vocab_size: int
    max_context_length: int
    backend: str
    lora_rank: int = 0
    """0: every parameter trains; else the rank of the session's LoRA adapter (num_parameters counts it)."""


@dataclass(frozen=True)
class ForwardResult:
    logprobs: list[np.ndarray]
    """Per datum, the learner's logprob of each target (float32, shaped like target_tokens)."""
    metrics: dict[str, float]


def clip_and_step(
    optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], grad_norm: torch.Tensor, params: AdamParams
) -> dict[str, float]:
    """The tail of every backend's optim_step, once the (scaled) gradients' global norm is known: clip to
    `grad_clip_norm`, set this step's AdamParams on every group, step, zero the gradients; the metrics."""
    if params.grad_clip_norm > 0 and parameters:
        torch.nn.utils.clip_grads_with_norm_(parameters, params.grad_clip_norm, grad_norm)
    for group in optimizer.param_groups:
        group.update(
            lr=params.learning_rate,
            betas=(params.beta1, params.beta2),
            eps=params.eps,
            weight_decay=params.weight_decay,
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"grad_norm:mean": float(grad_norm), "learning_rate:mean": params.learning_rate}


class LearnerBackend(ABC):
    """A full-parameter model plus AdamW state, addressed by Hugging Face parameter names."""

    @property
    @abstractmethod
    def description(self) -> ModelDescription: ...

    @property
    @abstractmethod
    def step(self) -> int:
        """Optimizer steps taken; also the weight version."""

    @abstractmethod
    def forward(
        self, batch: TrainingBatch, loss: LossSpec, loss_config: Mapping[str, float], backward: bool
    ) -> ForwardResult:
        """Compute per-token logprobs and the loss; with backward=True add its gradient to the accumulators."""

    @abstractmethod
    def optim_step(self, params: AdamParams) -> dict[str, float]:
        """Apply one AdamW step with the accumulated gradients, zero them, and return metrics."""

    @abstractmethod
    def save_state(self, directory: Path) -> None:
        """Write model, optimizer, step and RNG state into an existing empty directory."""

    @abstractmethod
    def load_state(self, directory: Path, with_optimizer: bool) -> None:
        """Restore a saved state; without the optimizer, AdamW state starts fresh. Reads and checks every
        file first and raises FailedPrecondition before changing anything when they do not fit."""

    @abstractmethod
    def save_weights(self, directory: Path) -> None:
        """Write a Hugging Face model directory (config, tokenizer, safetensors) into `directory`."""

    @abstractmethod
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Current weights by Hugging Face name (for publishing to rollout)."""

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op for single-process backends
        """Release what the session holds beyond this object (the megatron backend's shards on other ranks)."""
