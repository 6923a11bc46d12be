"""Rollout engines behind one interface; `build_engine` picks one by `config.type` (vLLM imported lazily)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rollout.config import TorchEngineConfig, VllmEngineConfig
from rollout.engines.base import RolloutEngine


async def build_engine(config: TorchEngineConfig | VllmEngineConfig, model_path: Path) -> RolloutEngine:
    if config.type == "vllm":
        from rollout.engines.vllm_engine import VllmEngine

        return VllmEngine.create(model_path, config)
    from rollout.engines.torch_engine import TorchEngine

    return await asyncio.to_thread(TorchEngine, model_path, config)
