"""The "checkpoint" transport: write a SaveWeights directory once, then every replica hot-loads it with
LoadWeights (for replicas that share the learner's filesystem)."""

from __future__ import annotations

import asyncio

import grpc

from learner.checkpoint import write_checkpoint
from learner.transports.base import ReplicaResult, WeightSource, WeightTransport
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc


class CheckpointTransport(WeightTransport):
    name = "checkpoint"

    async def publish(self, version: int, source: WeightSource, targets: list[str]) -> list[ReplicaResult]:
        directory = self.context.scratch_dir / f"published-v{version}"
        metadata = {"kind": "weights", "step": version, "base_model": self.context.base_model}
        await asyncio.to_thread(write_checkpoint, directory, source.save_weights, True, metadata)

        async def load(channel: grpc.aio.Channel) -> int:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)
            await stub.LoadWeights(
                rollout_pb2.LoadWeightsRequest(path=str(directory), version=version, rewind=self.context.rewind)
            )
            return 0

        return await self.on_each_replica(targets, load)
