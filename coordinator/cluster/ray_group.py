"""A Megatron learner's ranks on a Ray cluster: one placement-group bundle per rank.

Ray reserves every rank's resources at once (a placement group, PACK: as few nodes as fit), then a
`ServiceHost` actor on each bundle starts that rank's `python -m learner` with torch.distributed's
rendezvous in its environment (RANK, WORLD_SIZE, LOCAL_RANK by node, MASTER_ADDR/PORT of rank 0's node)
- what torchrun would set, but across whatever nodes Ray chose. Ranks other than 0 start first (they
wait in the rendezvous); rank 0 serves gRPC and prints `LISTENING`. The group is one service to the
coordinator: it has exited when any rank has, and stopping it stops rank 0 first (which tells the others
to shut down), then every actor, then frees the placement group.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.cluster.ray_services import RayService
from protos.errors import Unavailable

PLACEMENT_TIMEOUT_S = 120.0


@dataclass
class RayRankGroup:
    """The coordinator's handle on a learner whose ranks run behind one actor each."""

    name: str
    ranks: list[RayService]
    placement: Any

    @property
    def address(self) -> str:
        return self.ranks[0].address

    @property
    def pid(self) -> int:
        return self.ranks[0].pid

    @property
    def log_path(self) -> Path:
        return self.ranks[0].log_path

    @property
    def returncode(self) -> int | None:
        return next((r.returncode for r in self.ranks if r.returncode is not None), None)

    def poll(self) -> int | None:
        return next((code for code in (r.poll() for r in self.ranks) if code is not None), None)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        import ray

        try:
            code = self.ranks[0].stop(timeout_s)
            for rank in self.ranks[1:]:
                rank.stop(timeout_s=10.0)
        finally:
            ray.util.remove_placement_group(self.placement)
        return code

    def kill_group(self) -> None:
        import ray

        for rank in self.ranks:
            rank.kill_group()
        ray.util.remove_placement_group(self.placement)


async def start_rank_group(
    host_class: Any,
    count: int,
    bundle: dict[str, float],
    name: str,
    overrides: list[str],
    log_dir: Path,
    env: dict[str, str],
    timeout_s: float,
) -> RayRankGroup:
    """`count` ranks of `python -m learner` (Megatron), one per bundle of a new placement group."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    placement = ray.util.placement_group([dict(bundle) for _ in range(count)], strategy="PACK")
    actors: list = []
    try:
        try:
            await asyncio.wait_for(asyncio.wrap_future(placement.ready().future()), PLACEMENT_TIMEOUT_S)
        except TimeoutError:
            raise Unavailable(
                f"the Ray cluster cannot place {count} learner ranks of {bundle} within {PLACEMENT_TIMEOUT_S:g}s; "
                "add nodes, or lower tp * pp * dp or cluster.learner_resources"
            ) from None
        resources = dict(bundle)
        options = {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0), "resources": resources}
        for index in range(count):
            strategy = PlacementGroupSchedulingStrategy(placement, placement_group_bundle_index=index)
            actors.append(host_class.options(**options, scheduling_strategy=strategy, max_concurrency=4).remote())
        nodes = await asyncio.gather(*(asyncio.wrap_future(a.node.remote().future()) for a in actors))
        master_address, master_port = nodes[0][1], nodes[0][2]
        local_ranks = [[n[0] for n in nodes[:index]].count(nodes[index][0]) for index in range(count)]
        per_node = [[n[0] for n in nodes].count(node[0]) for node in nodes]

        def rank_env(index: int) -> dict[str, str]:
            rendezvous = {
                "RANK": index,
                "WORLD_SIZE": count,
                "LOCAL_RANK": local_ranks[index],
                "LOCAL_WORLD_SIZE": per_node[index],
                "MASTER_ADDR": master_address,
                "MASTER_PORT": master_port,
            }
            return {
                **env,
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                **{k: str(v) for k, v in rendezvous.items()},
            }

        async def start(index: int) -> RayService:
            rank_name = name if index == 0 else f"{name}-rank{index}"
            call = actors[index].start.remote(
                rank_name, "learner", overrides, str(log_dir), rank_env(index), timeout_s, (), index == 0
            )
            address, pid = await asyncio.wrap_future(call.future())
            return RayService(rank_name, actors[index], address, pid, log_dir / f"{rank_name}.log")

        followers = [await start(index) for index in range(1, count)]  # they wait in the rendezvous
        leader = await start(0)
    except ray.exceptions.RayError as exc:
        _abandon(actors, placement)
        raise Unavailable(f"{name} did not start on the Ray cluster: {exc}") from None
    except BaseException:
        _abandon(actors, placement)
        raise
    return RayRankGroup(name, [leader, *followers], placement)


def _abandon(actors: list, placement: Any) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)
    ray.util.remove_placement_group(placement)
