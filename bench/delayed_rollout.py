"""A real anvil-tiny rollout service (torch engine) whose every Sample answers a fixed time later: a replica
of known speed for the fleet routing benchmark. The delay stands for a GPU replica's generation time,
which overlaps across concurrent requests (continuous batching).

`ANVIL_BENCH_DELAY_MS=50 python -m bench.delayed_rollout` listens on 127.0.0.1:0 and prints
`LISTENING host:port` (an environment variable, so coordinator.launcher can start it like a service).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from coordinator.models import resolve_model
from protos.anvil.v1 import rollout_pb2_grpc
from protos.rpc import RunningServer, ServerConfig, ServiceSpec, serve_until_signal, start_server
from rollout.config import TorchEngineConfig
from rollout.engines import build_engine
from rollout.engines.base import PromptScoring, RolloutEngine, SampleResult, SamplingSpec
from rollout.service import RolloutServicer
from rollout.weights import WeightUpdater, checkpoint_shapes
from servicekit.process import die_with_parent

DELAY_ENV = "ANVIL_BENCH_DELAY_MS"


class DelayedEngine:
    """A real engine that answers every Sample `delay_s` later."""

    def __init__(self, engine: RolloutEngine, delay_s: float) -> None:
        self._engine, self._delay_s = engine, delay_s

    async def sample(self, prompt: list[int], n: int, spec: SamplingSpec, scoring: PromptScoring) -> SampleResult:
        await asyncio.sleep(self._delay_s)
        return await self._engine.sample(prompt, n, spec, scoring)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


async def start_delayed(delay_s: float) -> tuple[RunningServer, RolloutEngine]:
    """The service on 127.0.0.1:0 in this process, and its engine (to close after the server stops)."""
    model_dir = resolve_model("anvil-tiny")
    engine = await build_engine(TorchEngineConfig(device="cpu"), model_dir)
    served = DelayedEngine(engine, delay_s) if delay_s else engine
    servicer = RolloutServicer(served, WeightUpdater(engine, checkpoint_shapes(model_dir)), "anvil-tiny")
    spec = ServiceSpec(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer, "anvil.v1.RolloutService")
    return await start_server(ServerConfig(), [spec]), engine


async def serve(delay_s: float) -> None:
    running, engine = await start_delayed(delay_s)
    print(f"LISTENING {running.address}", flush=True)
    await serve_until_signal(running)
    await engine.close()


if __name__ == "__main__":
    die_with_parent()  # started by coordinator.launcher: never outlive the benchmark
    asyncio.run(serve(float(os.environ.get(DELAY_ENV, "0")) / 1000))
