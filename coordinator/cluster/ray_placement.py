"""Placing a run's services on a Ray cluster: the coordinator is the Ray driver; each service runs
behind a `ServiceHost` actor (coordinator/cluster/ray_services.py), a Megatron learner as a placement
group of one bundle per rank (coordinator/cluster/ray_group.py)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from coordinator.cluster.config import ClusterConfig
from coordinator.cluster.ray_group import RayRankGroup, start_rank_group
from coordinator.cluster.ray_services import RayService, ServiceHost
from protos.errors import FailedPrecondition, Unavailable

logger = logging.getLogger(__name__)


class RayPlacement:
    """Starts services on a Ray cluster (the coordinator is the driver)."""

    def __init__(self, config: ClusterConfig) -> None:
        try:
            import ray
        except ImportError:
            raise FailedPrecondition(
                '[cluster] type = "ray" needs Ray: pip install -e ".[ray]" (or set cluster.type = "local")'
            ) from None
        self.config = config
        if not ray.is_initialized():
            try:
                ray.init(address=self.config.address, log_to_driver=False, namespace="anvil")
            except ConnectionError as exc:
                raise Unavailable(
                    f"no Ray cluster at {self.config.address!r} ({exc}); start one with `ray start --head` "
                    "or set cluster.address to the head's host:port"
                ) from None
        self._host = ray.remote(ServiceHost)

    async def start(
        self,
        role: str,
        name: str,
        module: str,
        overrides: list[str],
        log_dir: Path,
        env: dict[str, str],
        timeout_s: float,
        ranks: int = 1,
    ) -> RayService | RayRankGroup:
        """Start `python -m module ...` on a node with the role's resources ("learner" or "rollout"); a
        learner of several ranks as a placement group of one bundle per rank (`learner_resources` each)."""
        import ray

        wanted = dict(self.config.learner_resources if role == "learner" else self.config.rollout_resources)
        if ranks > 1:
            bundle = wanted or {"CPU": 1}
            return await start_rank_group(self._host, ranks, bundle, name, overrides, log_dir, env, timeout_s)
        options = {
            "num_cpus": wanted.pop("CPU", 0),
            "num_gpus": wanted.pop("GPU", 0),
            "resources": wanted,
            "max_concurrency": 4,  # poll and stop while start waits
        }
        actor = self._host.options(**options).remote()
        try:
            started = actor.start.remote(name, module, overrides, str(log_dir), env, timeout_s, ())
            address, pid = await asyncio.wrap_future(started.future())
        except ray.exceptions.RayError as exc:
            ray.kill(actor)
            raise Unavailable(f"{name} did not start on the Ray cluster: {exc}") from None
        except BaseException:
            ray.kill(actor)
            raise
        logger.info("%s runs at %s (pid %d on its node)", name, address, pid)
        return RayService(name, actor, address, pid, log_dir / f"{name}.log")
