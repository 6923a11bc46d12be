"""A rollout server for weight sets no model here can serve: Anvil's RolloutServicer and WeightUpdater
over an engine that only holds the tensors.

The weight-sync benchmark publishes a synthetic ~0.5 B-parameter bf16 state dict (Qwen2.5-0.5B's
shapes) that no built-in model matches. Everything on the receiving side is the real code path
(gRPC server from protos.rpc, RolloutServicer, WeightUpdater, ChunkAssembler, digest check, the
serving gate) except the engine: `BufferEngine.load_weights` copies each tensor into a preallocated
buffer, which is what the torch reference engine's swap does (`parameter.copy_`).

`ANVIL_BENCH_SINK_PARAMS=N python -m bench.sink_rollout` listens on 127.0.0.1:0 and prints
`LISTENING host:port` (an environment variable, so coordinator.launcher can start it like a service).
"""

from __future__ import annotations

import asyncio
import math
import os
from pathlib import Path

import torch

from protos.rpc import RunningServer, ServerConfig, ServiceSpec, serve_until_signal, start_server
from rollout.engines.base import EngineDescription, RolloutEngine, SampleResult, SamplingSpec
from rollout.service import RolloutServicer, add_rollout_service
from rollout.weights import WeightUpdater
from servicekit.process import die_with_parent

PARAMS_ENV = "ANVIL_BENCH_SINK_PARAMS"
QWEN_05B = {"vocab": 151936, "hidden": 896, "intermediate": 4864, "layers": 24, "heads": 14, "kv_heads": 2}
"""Qwen2.5-0.5B's dimensions: 494 M parameters, ~0.99 GB in bf16."""


def synthetic_shapes(target_params: int) -> dict[str, tuple[int, ...]]:
    """HF Llama/Qwen parameter names and shapes with Qwen2.5-0.5B's widths, layers scaled to the target."""
    d = QWEN_05B
    head_dim = d["hidden"] // d["heads"]
    kv = d["kv_heads"] * head_dim
    layer = {
        "input_layernorm.weight": (d["hidden"],),
        "self_attn.q_proj.weight": (d["hidden"], d["hidden"]),
        "self_attn.k_proj.weight": (kv, d["hidden"]),
        "self_attn.v_proj.weight": (kv, d["hidden"]),
        "self_attn.o_proj.weight": (d["hidden"], d["hidden"]),
        "post_attention_layernorm.weight": (d["hidden"],),
        "mlp.gate_proj.weight": (d["intermediate"], d["hidden"]),
        "mlp.up_proj.weight": (d["intermediate"], d["hidden"]),
        "mlp.down_proj.weight": (d["hidden"], d["intermediate"]),
    }
    per_layer = sum(math.prod(shape) for shape in layer.values())
    embed = d["vocab"] * d["hidden"]
    if target_params >= embed + per_layer:
        vocab, layers = d["vocab"], max(1, round((target_params - embed) / per_layer))
    else:  # small smoke-test sizes: one layer and a vocabulary that fills the rest
        vocab, layers = max(1, (target_params - per_layer) // d["hidden"]), 1
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d["hidden"])}
    for index in range(layers):
        shapes.update({f"model.layers.{index}.{name}": shape for name, shape in layer.items()})
    shapes["model.norm.weight"] = (d["hidden"],)
    return shapes


def synthetic_state_dict(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """bf16 tensors of the given shapes with cheap, non-constant values (speed does not depend on them)."""
    state = {}
    for index, (name, shape) in enumerate(shapes.items()):
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        tensor.view(-1)[:] = (index + seed) % 7 - 3
        state[name] = tensor
    return state


class BufferEngine(RolloutEngine):
    """Holds one preallocated bf16 buffer per parameter; a swap copies the new tensors into them."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.buffers = {name: torch.zeros(shape, dtype=torch.bfloat16) for name, shape in shapes.items()}
        self._description = EngineDescription("buffer", Path("synthetic"), 1, 1, None)

    @property
    def description(self) -> EngineDescription:
        return self._description

    async def sample(self, prompt_tokens, num_samples, spec: SamplingSpec, scoring) -> SampleResult:
        raise NotImplementedError("the buffer engine serves weights only")

    async def compute_logprobs(self, tokens: list[int]) -> list[float]:
        raise NotImplementedError("the buffer engine serves weights only")

    async def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        await asyncio.to_thread(self._copy_in, tensors)

    @torch.no_grad()
    def _copy_in(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, buffer in self.buffers.items():
            buffer.copy_(tensors[name])

    async def close(self) -> None:
        self.buffers = {}


async def start_sink(params: int) -> RunningServer:
    """The sink's RolloutService on 127.0.0.1:0 in this process."""
    shapes = synthetic_shapes(params)
    engine = BufferEngine(shapes)
    servicer = RolloutServicer(engine, WeightUpdater(engine, shapes), "synthetic")
    spec = ServiceSpec(add_rollout_service, servicer, "anvil.v1.RolloutService")
    return await start_server(ServerConfig(), [spec])


async def serve(params: int) -> None:
    running = await start_sink(params)
    print(f"LISTENING {running.address}", flush=True)
    await serve_until_signal(running)


if __name__ == "__main__":
    die_with_parent()  # started by coordinator.launcher: never outlive the benchmark
    asyncio.run(serve(int(os.environ[PARAMS_ENV])))
