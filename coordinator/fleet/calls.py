"""The rollout calls a ReplicaSet serves, typed as the Python client's Tinker types: routed and failed
over by `ReplicaSet.call` (sampling, logprobs) or sent to every replica (versions, hot-loads)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from coordinator.client.convert import sample_response_from_proto, sampling_params_to_proto
from coordinator.client.types import SampleResponse, SamplingParams
from protos.anvil.v1 import rollout_pb2
from protos.status import call

if TYPE_CHECKING:
    from coordinator.fleet.health import FleetHealth
    from protos.anvil.v1.rollout_pb2_grpc import RolloutServiceStub

T = TypeVar("T")


class RolloutCalls:
    health: FleetHealth

    async def call(
        self,
        invoke: Callable[[RolloutServiceStub, float], Awaitable[T]],
        session_key: str | None = None,
        tokens_of: Callable[[T], int] | None = None,
    ) -> T:
        raise NotImplementedError

    def stub(self, name: str) -> RolloutServiceStub:
        raise NotImplementedError

    async def sample(
        self,
        prompt: list[int],
        num_samples: int,
        params: SamplingParams,
        include_prompt_logprobs: bool = False,
        session_key: str | None = None,
        return_routed_experts: bool = False,
    ) -> SampleResponse:
        request = rollout_pb2.SampleRequest(
            prompt_tokens=prompt,
            num_samples=num_samples,
            sampling_params=sampling_params_to_proto(params),
            include_prompt_logprobs=include_prompt_logprobs,
            return_routed_experts=return_routed_experts,
        )
        reply = await self.call(
            lambda stub, timeout: stub.Sample(request, timeout=timeout), session_key, _generated_tokens
        )
        return sample_response_from_proto(reply, include_prompt_logprobs)

    async def compute_logprobs(self, tokens: list[int], session_key: str | None = None) -> list[float | None]:
        request = rollout_pb2.ComputeLogprobsRequest(tokens=tokens)
        reply = await self.call(lambda stub, timeout: stub.ComputeLogprobs(request, timeout=timeout), session_key)
        return [None, *reply.logprobs]

    async def versions(self) -> list[int]:
        """The weight version each healthy replica serves, as its last probe or publication (verified by
        the replica's commit) reported it; no call, so a replica that just hung cannot hold the caller."""
        return [replica.version for replica in self.health.routable()]

    async def load_weights(self, path: str, version: int) -> None:
        """Hot-load a SaveWeights directory as `version` on every healthy replica."""
        request = rollout_pb2.LoadWeightsRequest(path=path, version=version)
        names = [r.name for r in self.health.routable()]
        await asyncio.gather(*(call(self.stub(name).LoadWeights(request)) for name in names))
        self.health.published(version, succeeded=names)


def _generated_tokens(reply: rollout_pb2.SampleResponse) -> int:
    return sum(len(sequence.tokens) for sequence in reply.sequences)
