"""Sampling-only base models: a teacher or a grader served beside the trained model, by its own rollout
replicas, and sampled by `create_sampling_client(base_model=<its name>)`.

They are never trained: no learner holds them, so `create_model` with one is a 400 naming the model that
is trained here. Each has its own ReplicaSet and SnapshotRouter (its base weights are the only snapshot
it serves), so its samples never wait behind the trained model's weight loads and vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coordinator.fleet.config import FleetConfig
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.models import resolve_model, same_model


@dataclass
class SamplingOnlyModel:
    name: str
    model_dir: Path
    router: SnapshotRouter


class SamplingOnlyModels:
    def __init__(self, models: list[SamplingOnlyModel]) -> None:
        self.models = models

    def find(self, base_model: str | None) -> SamplingOnlyModel | None:
        """The sampling-only model `base_model` names (in any form coordinator.models accepts), if any."""
        if not base_model:
            return None
        return next((m for m in self.models if same_model(base_model, m.name, m.model_dir)), None)

    def router_for(self, name: str) -> SnapshotRouter | None:
        return next((m.router for m in self.models if m.name == name), None)

    def capabilities(self) -> list[dict]:
        """Their entries in get_server_capabilities."""
        return [{"model_name": m.name, "trainable": False, "sampleable": True} for m in self.models]

    async def close(self) -> None:
        for model in self.models:
            await model.router.close()


async def connect_sampling_models(
    addresses: dict[str, list[str]], fleet: FleetConfig, api_key: str | None
) -> SamplingOnlyModels:
    """A router over each sampling-only model's replicas (`addresses`: model name → host:port list)."""
    models = []
    for name, replica_addresses in addresses.items():
        model_dir = resolve_model(name)
        router = SnapshotRouter(await ReplicaSet.connect(replica_addresses, fleet, api_key=api_key), model_dir)
        await router.start()
        models.append(SamplingOnlyModel(name, model_dir, router))
    return SamplingOnlyModels(models)
