"""SamplingClient: Tinker's sampling API over the rollout replicas of a ServiceClient."""

from __future__ import annotations

from typing import Any

from coordinator.client.connections import Connections
from coordinator.client.runtime import APIFuture
from coordinator.client.types import ModelInput, SampleResponse, SamplingParams
from protos.errors import FailedPrecondition


class SamplingClient:
    def __init__(self, connections: Connections, base_model: str, min_version: int = 0) -> None:
        self._connections = connections
        self._runtime = connections.runtime
        self.base_model = base_model
        self.min_version = min_version
        """Responses from older weights than this (a lagging replica) are refused, not returned."""

    def sample(
        self,
        prompt: ModelInput,
        num_samples: int,
        sampling_params: SamplingParams,
        include_prompt_logprobs: bool = False,
    ) -> APIFuture[SampleResponse]:
        async def sample() -> SampleResponse:
            response = await (await self._connections.replicas()).sample(
                prompt.to_ints(), num_samples, sampling_params, include_prompt_logprobs
            )
            if response.weight_version < self.min_version:
                raise FailedPrecondition(
                    f"a replica answered with weights v{response.weight_version}, older than v{self.min_version}"
                )
            return response

        return self._runtime.submit(sample())

    def compute_logprobs(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        async def compute() -> list[float | None]:
            return await (await self._connections.replicas()).compute_logprobs(prompt.to_ints())

        return self._runtime.submit(compute())

    async def sample_async(self, *args: Any, **kwargs: Any) -> APIFuture[SampleResponse]:
        return self.sample(*args, **kwargs)

    async def compute_logprobs_async(self, prompt: ModelInput) -> APIFuture[list[float | None]]:
        return self.compute_logprobs(prompt)

    def get_base_model(self) -> str:
        return self.base_model

    def get_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        from coordinator.models import resolve_model

        return AutoTokenizer.from_pretrained(resolve_model(self.base_model.split(":")[0]))
