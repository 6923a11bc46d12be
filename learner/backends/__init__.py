"""Learner backends behind one interface; `build_backend` picks one by `config.type` (heavy imports lazy)."""

from __future__ import annotations

from pathlib import Path

from learner.backends.base import LearnerBackend
from learner.config import BackendConfig


def build_backend(config: BackendConfig, model_path: Path, seed: int) -> LearnerBackend:
    if config.type == "torch":
        from learner.backends.torch_backend import TorchBackend

        return TorchBackend(model_path, config, seed)
    if config.type == "megatron":
        from learner.backends.megatron.backend import MegatronBackend

        return MegatronBackend(model_path, config, seed)
    raise ValueError(f"unknown learner backend {config.type!r}")  # unreachable: pydantic checks the union
