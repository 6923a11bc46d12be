"""TrainingClient: Tinker's training API over one full-parameter learner session.

Every method returns an APIFuture at once and takes its seq_id at call time, so calls made back to
back run in call order on the learner even while earlier ones are still in flight. `*_async` forms
return the same future from a coroutine, as Tinker's do.
"""

from __future__ import annotations

from typing import Any

from coordinator.client.connections import Connections
from coordinator.client.custom_loss import CustomLossFn, forward_backward_custom
from coordinator.client.learner_api import LearnerSession
from coordinator.client.runtime import APIFuture, Runtime
from coordinator.client.sampling_client import SamplingClient
from coordinator.client.types import (
    AdamParams,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    LoadWeightsResponse,
    ModelData,
    OptimStepResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
)
from protos.errors import Unavailable


class TrainingClient:
    def __init__(self, connections: Connections, session: LearnerSession) -> None:
        self._connections = connections
        self._runtime: Runtime = connections.runtime
        self.session = session

    # --- training -----------------------------------------------------------------------------------

    def forward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._runtime.submit(self.session.forward(data, loss_fn, loss_fn_config))

    def forward_backward(
        self, data: list[Datum], loss_fn: str, loss_fn_config: dict | None = None
    ) -> APIFuture[ForwardBackwardOutput]:
        return self._runtime.submit(self.session.forward_backward(data, loss_fn, loss_fn_config))

    def forward_backward_custom(self, data: list[Datum], loss_fn: CustomLossFn) -> APIFuture[ForwardBackwardOutput]:
        return self._runtime.submit(forward_backward_custom(self.session, data, loss_fn))

    def optim_step(self, adam_params: AdamParams | None = None) -> APIFuture[OptimStepResponse]:
        async def step() -> OptimStepResponse:
            reply = await self.session.optim_step(adam_params)
            return OptimStepResponse(metrics=dict(reply.metrics))

        return self._runtime.submit(step())

    # --- checkpoints --------------------------------------------------------------------------------

    def save_state(self, name: str, overwrite: bool = False) -> APIFuture[SaveWeightsResponse]:
        async def save() -> SaveWeightsResponse:
            return SaveWeightsResponse(path=(await self.session.save_state(name, overwrite=overwrite)).path)

        return self._runtime.submit(save())

    def load_state(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self._load(path, with_optimizer=False)

    def load_state_with_optimizer(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self._load(path, with_optimizer=True)

    def _load(self, path: str, with_optimizer: bool) -> APIFuture[LoadWeightsResponse]:
        async def load() -> LoadWeightsResponse:
            await self.session.load_state(path, with_optimizer=with_optimizer)
            return LoadWeightsResponse(path=path)

        return self._runtime.submit(load())

    def save_weights_for_sampler(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        async def save() -> SaveWeightsForSamplerResponse:
            return SaveWeightsForSamplerResponse(path=(await self.session.save_weights(name, overwrite=True)).path)

        return self._runtime.submit(save())

    async def _publish(self) -> int:
        """Publish as the learner's step, or past what the replicas serve when other sessions published
        there first (versions on a replica only increase). Runs on the runtime loop."""
        replicas = await self._connections.replicas()
        step = int((await self.session.get_info()).step)
        served = max(await replicas.versions(), default=0)
        version = step if step > served else served + 1
        reply = await replicas.publish(
            lambda addresses, rewind=False: self.session.publish_weights(
                addresses, version=version, partial_ok=True, rewind=rewind
            )
        )
        if reply is None or not any(target.ok for target in reply.targets):
            raise Unavailable(f"no rollout replica took weights v{version} ({replicas.describe()})")
        return reply.version

    def save_weights_and_get_sampling_client(self, name: str | None = None) -> SamplingClient:
        """Publish the current weights to every rollout replica and sample from that version."""
        version = self._runtime.run(self._publish())
        return SamplingClient(self._connections, self.session.info.base_model, min_version=version)

    # --- description --------------------------------------------------------------------------------

    def get_info(self) -> GetInfoResponse:
        info = self.session.info
        return GetInfoResponse(
            model_id=self.session.session_id,
            model_data=ModelData(arch="llama", model_name=info.base_model, tokenizer_id=info.tokenizer_path),
            is_lora=False,
            lora_rank=None,
            model_name=info.base_model,
        )

    def get_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.session.info.tokenizer_path)

    # --- async forms ----------------------------------------------------------------------------------

    async def forward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward(*args, **kwargs)

    async def forward_backward_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward(*args, **kwargs)

    async def forward_backward_custom_async(self, *args: Any, **kwargs: Any) -> APIFuture[ForwardBackwardOutput]:
        return self.forward_backward_custom(*args, **kwargs)

    async def optim_step_async(self, *args: Any, **kwargs: Any) -> APIFuture[OptimStepResponse]:
        return self.optim_step(*args, **kwargs)

    async def save_state_async(self, *args: Any, **kwargs: Any) -> APIFuture[SaveWeightsResponse]:
        return self.save_state(*args, **kwargs)

    async def load_state_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state(path)

    async def load_state_with_optimizer_async(self, path: str) -> APIFuture[LoadWeightsResponse]:
        return self.load_state_with_optimizer(path)

    async def save_weights_for_sampler_async(self, name: str) -> APIFuture[SaveWeightsForSamplerResponse]:
        return self.save_weights_for_sampler(name)

    async def save_weights_and_get_sampling_client_async(self, name: str | None = None) -> SamplingClient:
        version = await self._runtime.submit(self._publish())
        return SamplingClient(self._connections, self.session.info.base_model, min_version=version)
