"""How the weight-sync benchmark publishes: replicas to publish to, and one publication done step by step
(stream: serialize, transfer, stage, swap; checkpoint: write, load) or end to end as the learner does it."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.common import Stopwatch, Timing
from bench.sink_rollout import PARAMS_ENV, start_sink
from coordinator.launcher import start_service, toml_value
from learner.transports.base import PublishContext, raise_first_failure
from learner.transports.shm import ShmTransport
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.weights_codec import framed_push_requests, push_weight_update
from protos.weights_digest import tree_digest
from rollout.config import RolloutConfig, TorchEngineConfig, VllmEngineConfig
from rollout.server import start_rollout

PUSH_METHOD = "/anvil.v1.RolloutService/PushWeights"
SHM = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Replica:
    """A rollout replica the benchmark publishes to (a process, or a server in this process for --quick)."""

    def __init__(self, label: str, address: str, stop: Callable[[], Awaitable[None]], pid: int | None = None) -> None:
        self.label, self.address, self.stop, self.pid = label, address, stop, pid
        """`pid` is None when the replica runs in this process."""
        self._versions = itertools.count(1)

    def next_version(self) -> int:
        return next(self._versions)


async def stream_phases(replica: Replica, named: list[tuple[str, torch.Tensor]], chunk_bytes: int) -> dict[str, float]:
    """One stream publication done step by step, each step timed."""
    watch, version = Stopwatch(), replica.next_version()
    async with open_channel(replica.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        start = time.perf_counter()
        with watch.phase("serialize"):
            snapshot = sorted(tensors_as_bytes(named), key=lambda tensor: tensor.name)
            requests = list(framed_push_requests(version, snapshot, chunk_bytes))
            expected = tree_digest([(t.name, t.dtype, t.shape, t.data) for t in snapshot])
        with watch.phase("transfer"):
            await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=version))
            await channel.stream_unary(PUSH_METHOD, request_serializer=None)(iter(requests))
        commit_start = time.perf_counter()
        reply = await stub.CommitWeightUpdate(rollout_pb2.CommitWeightUpdateRequest(version=version, digest=expected))
        commit_s = time.perf_counter() - commit_start
        watch.phases["swap"] = reply.swap_duration_s
        watch.phases["stage"] = commit_s - reply.swap_duration_s
        watch.phases["total"] = time.perf_counter() - start
    return watch.phases


async def repeat_phases(label: str, repeats: int, run, num_bytes: int) -> tuple[Timing, dict[str, Timing]]:
    """Run a phase-reporting publication `repeats` times (+1 warm-up); Timings of the total and each phase."""
    await run()
    samples = [await run() for _ in range(repeats)]
    phases = {
        name: Timing(f"{label} · {name}", [sample[name] for sample in samples], num_bytes)
        for name in samples[0]
        if name != "total"
    }
    return Timing(f"{label} · sum of phases", [s["total"] for s in samples], num_bytes), phases


async def e2e_stream_direct(replica: Replica, named: list[tuple[str, torch.Tensor]], chunk_bytes: int) -> None:
    """What the learner's publisher does for one replica: snapshot, then push_weight_update."""
    snapshot = await asyncio.to_thread(tensors_as_bytes, named)
    async with open_channel(replica.address) as channel:
        await push_weight_update(channel, replica.next_version(), snapshot, chunk_bytes)


async def checkpoint_phases(replica: Replica, state: dict[str, torch.Tensor], directory: Path) -> dict[str, float]:
    """safetensors into tmpfs, then LoadWeights: the checkpoint transport's two steps."""
    watch = Stopwatch()
    start = time.perf_counter()
    with watch.phase("write"):
        directory.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(save_file, state, directory / "model.safetensors")
    async with open_channel(replica.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        with watch.phase("load"):
            await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(directory), version=replica.next_version()))
    watch.phases["total"] = time.perf_counter() - start
    return watch.phases


async def start_replica(
    args: argparse.Namespace, label: str, logs: Path, model_dir: Path | None = None, engine: str = "torch"
) -> Replica:
    """A rollout replica serving `model_dir` with `engine`, or the synthetic sink when model_dir is None."""
    if args.in_process:
        if model_dir is None:
            running = await start_sink(args.synthetic_params)
            return Replica(label, running.address, lambda: running.stop(0))
        config = RolloutConfig(model=model_dir, engine=TorchEngineConfig() if engine == "torch" else VllmEngineConfig())
        running, servicer = await start_rollout(config)

        async def stop() -> None:
            await running.stop(0)
            await servicer.engine.close()

        return Replica(label, running.address, stop)
    if model_dir is None:
        module, overrides, env = "bench.sink_rollout", [], {PARAMS_ENV: str(args.synthetic_params)}
    else:
        module, overrides, env = "rollout", [f"model={toml_value(model_dir)}", f'engine.type="{engine}"'], {}
    process = await start_service(label, module, overrides, logs, env, 300)

    async def stop_process() -> None:
        process.stop()

    return Replica(label, process.address, stop_process, process.pid)


async def shm_publish(replica: Replica, named: list[tuple[str, torch.Tensor]], scratch: Path) -> None:
    """The learner's shm transport from these tensors to the replica, as PublishWeights runs it."""
    context = PublishContext(scratch_dir=scratch, base_model="synthetic", api_key=None)
    source = _Tensors(named)
    results = await ShmTransport(context).publish(replica.next_version(), source, [replica.address])
    raise_first_failure(results)


class _Tensors:
    """A WeightSource over a fixed list of named tensors."""

    def __init__(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.named = named

    def named_weights(self):
        return iter(self.named)

    def save_weights(self, directory: Path) -> None:
        raise NotImplementedError("the shm transport never writes a directory")
