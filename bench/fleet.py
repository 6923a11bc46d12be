"""Rollout fleet routing: what the ReplicaSet costs per request, and what least-in-flight routing buys.

1. Overhead: Sample (anvil-tiny, 4 new tokens) on one replica, sequentially, through `ReplicaSet.sample`
   (pick, in-flight accounting, the dead-replica watch, failover wrapper) vs the same request on the same
   replica's stub directly with the same Tinker-type conversions (what the loop's round-robin pool did),
   interleaved. Target: fleet / direct latency ≤ 1.05.
2. Policy: two replicas of unequal speed under `--concurrency` requesters: the same torch engine, answering
   each Sample `--fast-ms` (one replica) or `--slow-ms` (the other) later. The added latency stands for a
   GPU replica's generation time, which overlaps across concurrent requests (continuous batching); the
   engines' own CPU work is kept small (one new token), because on this 2-core machine both replicas share
   the CPU, and CPU-bound replicas would measure the machine, not the routing. Throughput of least-in-flight
   routing (ReplicaSet) vs round-robin over the same two replicas (what the loop's pool did before),
   interleaved. Target: least-in-flight / round-robin ≥ 1.2.

Real rollout services on loopback (RolloutServicer, gRPC, the torch engine): in this process for the
overhead, one process per replica for the policy (bench/delayed_rollout.py).

    python -m bench.fleet            # 200 overhead rounds, 4 policy rounds of 64 requests
    python -m bench.fleet --quick
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from pathlib import Path

from bench.common import Ratio, Timing, base_parser, console, run_main, time_interleaved, timing_table, write_results
from bench.delayed_rollout import DELAY_ENV, start_delayed
from coordinator.client.convert import sample_response_from_proto, sampling_params_to_proto
from coordinator.client.types import SampleResponse, SamplingParams
from coordinator.fleet.config import FleetConfig
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.launcher import start_service
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.status import call

PROMPT = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5]
PARAMS = SamplingParams(max_tokens=4, seed=0, stop=[])
POLICY_PARAMS = SamplingParams(max_tokens=1, seed=0, stop=[])


def sample_request(params: SamplingParams) -> rollout_pb2.SampleRequest:
    return rollout_pb2.SampleRequest(
        prompt_tokens=PROMPT, num_samples=1, sampling_params=sampling_params_to_proto(params)
    )


async def overhead(rounds: int) -> list[Timing]:
    server, engine = await start_delayed(0.0)
    fleet = await ReplicaSet.connect([server.address], FleetConfig())
    try:
        async with open_channel(server.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)

            async def direct() -> SampleResponse:  # what the loop's round-robin pool did per request
                return sample_response_from_proto(await call(stub.Sample(sample_request(PARAMS))), False)

            return await time_interleaved(
                [
                    ("one replica: Sample on its stub directly", direct, 0),
                    ("one replica: Sample through ReplicaSet", lambda: fleet.sample(PROMPT, 1, PARAMS), 0),
                ],
                repeats=rounds,
                warmup=5,
            )
    finally:
        await fleet.close()
        await server.stop(0)
        await engine.close()


async def policy(
    logs: Path, rounds: int, requests: int, concurrency: int, fast_ms: float, slow_ms: float
) -> list[Timing]:
    """Each replica is its own process (its own core here), so their engines do not share a GIL."""
    fast, slow = [
        await start_service(name, "bench.delayed_rollout", [], logs, {DELAY_ENV: str(delay)}, 120)
        for name, delay in (("fast", fast_ms), ("slow", slow_ms))
    ]
    fleet = await ReplicaSet.connect([fast.address, slow.address], FleetConfig())
    channels = [open_channel(address) for address in (fast.address, slow.address)]
    stubs = itertools.cycle([rollout_pb2_grpc.RolloutServiceStub(channel) for channel in channels])
    request = sample_request(POLICY_PARAMS)

    async def drive(one_request) -> None:
        queue = iter(range(requests))

        async def worker() -> None:
            for _ in queue:
                await one_request()

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        return await time_interleaved(
            [
                ("two unequal replicas: round-robin", lambda: drive(lambda: next(stubs).Sample(request)), 0),
                (
                    "two unequal replicas: least in-flight",
                    lambda: drive(lambda: fleet.sample(PROMPT, 1, POLICY_PARAMS)),
                    0,
                ),
            ],
            repeats=rounds,
            warmup=1,
        )
    finally:
        await fleet.close()
        for channel in channels:
            await channel.close()
        for process in (fast, slow):
            process.stop()


async def main(args) -> None:
    rounds, policy_rounds, requests = (30, 2, 32) if args.quick else (200, 4, 96)
    started = time.perf_counter()
    timings = await overhead(rounds)
    with tempfile.TemporaryDirectory() as logs:
        timings += await policy(Path(logs), policy_rounds, requests, args.concurrency, args.fast_ms, args.slow_ms)
    console.print(timing_table("fleet routing", timings))
    direct, routed, round_robin, least = timings
    ratios = [
        Ratio("routing overhead", routed.median / direct.median,
              "ReplicaSet latency / direct stub latency, one replica", 1.05, higher_is_better=False),
        Ratio("least in-flight vs round-robin", round_robin.median / least.median,
              "throughput of least-in-flight routing / round-robin, two replicas of unequal speed", 1.2),
    ]  # fmt: skip
    config = {"rounds": rounds, "policy_rounds": policy_rounds, "requests": requests, "concurrency": args.concurrency,
              "fast_ms": args.fast_ms, "slow_ms": args.slow_ms, "wall_s": time.perf_counter() - started}  # fmt: skip
    write_results("fleet", args.out, config, timings, ratios)


if __name__ == "__main__":
    parser = base_parser("fleet", __doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once in the policy bench")
    parser.add_argument("--fast-ms", type=float, default=50.0, help="added latency of the faster replica")
    parser.add_argument("--slow-ms", type=float, default=250.0, help="added latency of the slower replica")
    run_main(main, parser.parse_args())
