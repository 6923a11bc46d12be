"""Where the services a run starts are placed: on this machine (the default) or on a Ray cluster."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ClusterConfig(BaseModel):
    """`[cluster]` of a run or `anvil serve` config."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["local", "ray"] = "local"
    """"local": every service this run starts is a process on this machine. "ray": the learner and each
    rollout replica run on the Ray nodes Ray picks (each behind a Ray actor on its node); the coordinator
    is the Ray driver. Needs the `ray` extra (`pip install -e ".[ray]"`)."""
    address: str = "auto"
    """The Ray cluster to join: "auto" (the one `ray start` made on this machine) or the head's host:port."""
    learner_resources: dict[str, float] = Field(default_factory=dict)
    """Ray resources the learner needs, e.g. {GPU = 1} or a custom node label {trainer = 1}."""
    rollout_resources: dict[str, float] = Field(default_factory=dict)
    """Ray resources each rollout replica needs, e.g. {GPU = 1} or a custom node label {inference = 1}."""
