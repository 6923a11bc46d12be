"""FleetConfig: how the coordinator watches, routes across and restarts its rollout replicas."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

REPLICAS_PATH = "/anvil/v1/replicas"
"""Where `anvil serve` serves the fleet's REST API (coordinator/fleet/routes.py; `anvil replicas` calls it)."""


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    probe_interval_s: float = Field(default=2.0, gt=0)
    """How often every replica is probed (GetInfo: is it answering, which weight version it serves)."""
    probe_timeout_s: float = Field(default=2.0, gt=0)
    """A probe not answered within this counts as a failure."""
    failures_to_dead: int = Field(default=3, ge=1)
    """Consecutive failed probes or requests after which a replica is dead (its requests move at once)."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """A Sample or ComputeLogprobs not answered within this fails over to another replica."""
    no_replica_timeout_s: float = Field(default=600.0, gt=0)
    """A request waits this long for a healthy replica (saying why it waits) before failing the run."""
    publish_timeout_s: float = Field(default=300.0, gt=0)
    """A replica that has not taken published weights within this counts as failed (and is resynced later)."""
    hung_kill_after_s: float = Field(default=60.0, gt=0)
    """A replica this process started that has been dead by probes this long while its process still runs
    (hung, or stopped) is killed, so that it is restarted like one that exited."""
    max_restarts: int = Field(default=5, ge=0)
    """Restarts of each replica the coordinator started itself, per run (then it stays dead)."""
    restart_backoff_s: float = Field(default=1.0, ge=0)
    """Wait before the first restart of a replica; it doubles for each further one (at most 30 s)."""
