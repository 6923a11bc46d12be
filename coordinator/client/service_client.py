"""ServiceClient: the entry point of Anvil's Tinker-style Python client, over gRPC.

    client = ServiceClient(learner_address="127.0.0.1:50051", rollout_addresses=["127.0.0.1:50052"])
    training = client.create_training_client("anvil-tiny")     # full-parameter: lora_rank must be 0

Addresses default to $ANVIL_LEARNER_ADDRESS and $ANVIL_ROLLOUT_ADDRESSES (comma-separated), the key to
$ANVIL_API_KEY. `base_url` is accepted as the learner address for drop-in use. Creating a LoRA client
(`create_lora_training_client(..., rank > 0)`) fails with INVALID_ARGUMENT: Anvil trains full
parameters only.
"""

from __future__ import annotations

import os
from typing import Any

from coordinator.client.connections import Connections
from coordinator.client.learner_api import LearnerSession
from coordinator.client.sampling_client import SamplingClient
from coordinator.client.training_client import TrainingClient
from protos.errors import InvalidArgument


class ServiceClient:
    def __init__(
        self,
        base_url: str | None = None,
        *,
        learner_address: str | None = None,
        rollout_addresses: list[str] | None = None,
        api_key: str | None = None,
    ) -> None:
        self.learner_address = learner_address or base_url or os.environ.get("ANVIL_LEARNER_ADDRESS")
        env_rollouts = [a for a in os.environ.get("ANVIL_ROLLOUT_ADDRESSES", "").split(",") if a]
        self.rollout_addresses = list(rollout_addresses or env_rollouts)
        self.api_key = api_key or os.environ.get("ANVIL_API_KEY")
        self.connections = Connections(self.learner_address, self.rollout_addresses, self.api_key)
        self.runtime = self.connections.runtime

    # --- clients -----------------------------------------------------------------------------------------

    async def _create_session(self, base_model: str, lora_rank: int, seed: int | None) -> LearnerSession:
        if lora_rank:
            raise InvalidArgument(
                f"lora_rank={lora_rank}: Anvil trains full parameters only; create the client with lora_rank=0"
            )
        return await LearnerSession.create(self.connections.learner_channel(), base_model, 0, seed or 0)

    def create_training_client(self, base_model: str, lora_rank: int = 0, seed: int | None = None) -> TrainingClient:
        return TrainingClient(self.connections, self.runtime.run(self._create_session(base_model, lora_rank, seed)))

    async def create_training_client_async(
        self, base_model: str, lora_rank: int = 0, seed: int | None = None
    ) -> TrainingClient:
        session = await self.runtime.submit(self._create_session(base_model, lora_rank, seed))
        return TrainingClient(self.connections, session)

    def create_lora_training_client(
        self, base_model: str, rank: int = 32, seed: int | None = None, **_: Any
    ) -> TrainingClient:
        """Tinker's name; any rank > 0 is refused with a message saying to use lora_rank=0."""
        return self.create_training_client(base_model, lora_rank=rank, seed=seed)

    def create_training_client_from_state(
        self, path: str, base_model: str, with_optimizer: bool = False
    ) -> TrainingClient:
        client = self.create_training_client(base_model)
        client._load(path, with_optimizer=with_optimizer).result()
        return client

    def create_sampling_client(self, model_path: str | None = None, base_model: str | None = None) -> SamplingClient:
        """Sample what the replicas serve; with model_path, hot-load that SaveWeights directory first."""
        version = 0
        if model_path is not None:

            async def hot_load() -> int:
                replicas = await self.connections.replicas()
                new_version = max(await replicas.versions(), default=0) + 1
                await replicas.load_weights(model_path, new_version)
                return new_version

            version = self.runtime.run(hot_load())
        return SamplingClient(self.connections, base_model or model_path or "", min_version=version)

    async def create_sampling_client_async(self, *args: Any, **kwargs: Any) -> SamplingClient:
        return self.create_sampling_client(*args, **kwargs)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def close(self) -> None:
        self.connections.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
