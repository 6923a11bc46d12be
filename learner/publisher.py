"""PublishWeights: push the learner's current weights, as version = step, to rollout replicas.

Transports: "stream" runs the rollout's Begin/Push/Commit transaction with the chunk codec of
protos.weights_codec (digest verified end to end); "checkpoint" writes a SaveWeights directory and asks
each replica to LoadWeights it (replicas that share the filesystem). Replicas are updated concurrently;
the call fails if any replica fails, naming it. The learner's own API key is sent to the replicas.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import grpc
import torch

from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.errors import InvalidArgument, Unavailable
from protos.status import error_from_rpc
from protos.weights_codec import TensorBytes, push_weight_update

TRANSPORTS = ("stream", "checkpoint")


def check_publish_request(targets: list[str], transport: str) -> str:
    """Validate before any work; return the transport with the default filled in."""
    if not targets or any(not address for address in targets):
        raise InvalidArgument("targets is empty or holds an empty address; name each rollout as host:port")
    transport = transport or "stream"
    if transport not in TRANSPORTS:
        raise InvalidArgument(f"unknown transport {transport!r}; use one of {list(TRANSPORTS)}")
    return transport


def tensors_as_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorBytes]:
    """Snapshot tensors as contiguous CPU bytes under their Hugging Face names."""
    snapshot = []
    for name, tensor in named_tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        dtype = str(cpu.dtype).removeprefix("torch.")
        snapshot.append(TensorBytes(name, dtype, tuple(cpu.shape), cpu.view(torch.uint8).numpy()))
    return snapshot


async def _on_each(targets: list[str], api_key: str | None, call: Callable[[grpc.aio.Channel], Awaitable[int]]) -> int:
    async def one(address: str) -> int:
        async with open_channel(address, api_key=api_key) as channel:
            try:
                return await call(channel)
            except grpc.aio.AioRpcError as exc:
                error = error_from_rpc(exc)
                if isinstance(error, grpc.RpcError):
                    raise Unavailable(f"rollout {address} failed: {exc.code().name}: {exc.details()}") from exc
                raise type(error)(f"rollout {address}: {error}") from exc

    return max(await asyncio.gather(*(one(address) for address in targets)))


async def publish_stream(targets: list[str], version: int, snapshot: list[TensorBytes], api_key: str | None) -> int:
    """Stream `snapshot` as `version` to every target; return the bytes sent to each."""
    return await _on_each(targets, api_key, lambda channel: push_weight_update(channel, version, snapshot))


async def publish_checkpoint(targets: list[str], version: int, directory: Path, api_key: str | None) -> int:
    """Have every target hot-load `directory` as `version`."""

    async def load(channel: grpc.aio.Channel) -> int:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        await stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=str(directory), version=version))
        return 0

    return await _on_each(targets, api_key, load)
