"""Async access to one or more rollout replicas: round-robin sampling, logprobs, hot-loads."""

from __future__ import annotations

import itertools

import grpc

from coordinator.client.convert import sample_response_from_proto, sampling_params_to_proto
from coordinator.client.types import SampleResponse, SamplingParams
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.status import call


class RolloutPool:
    """Channels to every replica, opened on the running event loop; requests rotate across replicas."""

    def __init__(self, addresses: list[str], api_key: str | None = None) -> None:
        if not addresses:
            raise ValueError("a RolloutPool needs at least one rollout address")
        self.addresses = list(addresses)
        self._channels: list[grpc.aio.Channel] = [open_channel(a, api_key=api_key) for a in self.addresses]
        self._stubs = [rollout_pb2_grpc.RolloutServiceStub(channel) for channel in self._channels]
        self._turn = itertools.cycle(range(len(self._stubs)))

    def _next(self) -> rollout_pb2_grpc.RolloutServiceStub:
        return self._stubs[next(self._turn)]

    async def sample(
        self, prompt: list[int], num_samples: int, params: SamplingParams, include_prompt_logprobs: bool = False
    ) -> SampleResponse:
        request = rollout_pb2.SampleRequest(
            prompt_tokens=prompt,
            num_samples=num_samples,
            sampling_params=sampling_params_to_proto(params),
            include_prompt_logprobs=include_prompt_logprobs,
        )
        reply = await call(self._next().Sample(request))
        return sample_response_from_proto(reply, include_prompt_logprobs)

    async def compute_logprobs(self, tokens: list[int]) -> list[float | None]:
        reply = await call(self._next().ComputeLogprobs(rollout_pb2.ComputeLogprobsRequest(tokens=tokens)))
        return [None, *reply.logprobs]

    async def versions(self) -> list[int]:
        infos = [await call(stub.GetInfo(rollout_pb2.RolloutServiceGetInfoRequest())) for stub in self._stubs]
        return [info.weight_version for info in infos]

    async def load_weights(self, path: str, version: int) -> None:
        for stub in self._stubs:
            await call(stub.LoadWeights(rollout_pb2.LoadWeightsRequest(path=path, version=version)))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
