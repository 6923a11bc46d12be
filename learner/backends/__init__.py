"""Learner backends behind one interface; `build_backend` picks one by `config.type` (heavy imports lazy)."""

from __future__ import annotations

from pathlib import Path

from learner.backends.base import LearnerBackend
from learner.backends.lora import LoraSpec
from learner.config import BackendConfig
from protos.errors import FailedPrecondition


def build_backend(config: BackendConfig, model_path: Path, seed: int, lora: LoraSpec | None = None) -> LearnerBackend:
    if config.type == "torch":
        from learner.backends.torch_backend import TorchBackend

        return TorchBackend(model_path, config, seed, lora)
    if lora is not None:
        raise FailedPrecondition(
            f"LoRA sessions run on the torch learner backend, and this learner runs {config.type}; create the "
            "session with lora_rank 0 or start a torch learner"
        )
    if config.type == "megatron":
        from learner.backends.megatron.backend import MegatronBackend

        return MegatronBackend(model_path, config, seed)
    raise ValueError(f"unknown learner backend {config.type!r}")  # unreachable: pydantic checks the union
