"""The "direct" transport: the rollout's Begin/Push/Commit transaction over gRPC to each target on its
own, chunked by protos.weights_codec and digest-verified end to end before the replica swaps. The
"stream" transport (learner/transports/relay.py) sends the same bytes once and lets replicas relay them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import torch

from learner.transports.base import ReplicaResult, WeightSource, WeightTransport
from protos.weights_codec import DeltaBase, TensorBytes, push_weight_update


def tensors_as_bytes(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[TensorBytes]:
    """Snapshot tensors as contiguous CPU bytes under their Hugging Face names."""
    snapshot = []
    for name, tensor in named_tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        dtype = str(cpu.dtype).removeprefix("torch.")
        snapshot.append(TensorBytes(name, dtype, tuple(cpu.shape), cpu.view(torch.uint8).numpy()))
    return snapshot


class DirectTransport(WeightTransport):
    name = "direct"

    async def publish(self, version: int, source: WeightSource, targets: list[str]) -> list[ReplicaResult]:
        snapshot = await asyncio.to_thread(tensors_as_bytes, source.named_weights())
        results = await self.send_directly(version, snapshot, targets, base=self.delta_base())
        await self.remember(version, snapshot, results)
        return results

    async def send_directly(
        self,
        version: int,
        snapshot: list[TensorBytes],
        targets: list[str],
        digest: str | None = None,
        base: DeltaBase | None = None,
    ) -> list[ReplicaResult]:
        """Begin/Push/Commit to each target on its own; as deltas from `base` to those that hold it."""
        return await self.on_each_replica(
            targets,
            lambda channel: push_weight_update(
                channel, version, snapshot, known_digest=digest, base=base, rewind=self.context.rewind
            ),
        )

    def delta_base(self) -> DeltaBase | None:
        published = self.context.published
        return published.base if published is not None else None

    async def remember(self, version: int, snapshot: list[TensorBytes], results: list[ReplicaResult]) -> None:
        """Keep what replicas now hold, for the next publication's deltas (when the session keeps any)."""
        if self.context.published is not None and any(r.error is None for r in results):
            await asyncio.to_thread(self.context.published.remember, version, snapshot)
