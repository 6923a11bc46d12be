"""Fan-out: one learner publishing to N replicas, relayed ("stream") against one send each ("direct").

A real learner's PublishWeights to N = 1 and N = 3 rollout replicas (torch engine, each its own process,
or in this process with --quick), the two transports timed round-robin. Reported: publish time N=3 / N=1
for each transport (target for the relay: <= 1.5) and the learner's egress per model byte at N=3, from
PublishWeightsResponse.egress_bytes (target <= 1.1: the relay sends each byte once; "direct" sends 3).
On 2 shared cores three replicas also share the CPU that receives, verifies and swaps: the N=3 times
carry that, as a cluster with a machine per replica would not. Then lossless deltas: a learner with
deltas on takes an Adam step before each publication to the 3 replicas; reported are the bytes per sync
over the model's and the publish time against the raw stream's.

    python -m bench.fanout            # anvil-small, replicas as processes
    python -m bench.fanout --quick    # anvil-tiny, replicas in this process
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    MiB,
    Ratio,
    Timing,
    base_parser,
    console,
    run_main,
    time_interleaved,
    timing_table,
    write_results,
)
from bench.learner_overhead import LOSS, rl_rows
from bench.publication import SHM, start_replica
from coordinator.models import resolve_model
from learner.config import LearnerConfig
from learner.server import start_learner
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.arrow_schemas import encode_batch, make_batch
from protos.channels import open_channel

REPLICAS = 3
STEP_LR = 3e-4
"""The main job's learning rate: how far one step moves the weights decides how well a delta compresses."""


async def bench_fanout(args: argparse.Namespace, logs: Path, repeats: int) -> tuple[list[Timing], list[Ratio]]:
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="anvil-bench-learner-", dir=SHM) as checkpoints:
        # Deltas off (the default): these cases publish the same weights again and again.
        config = LearnerConfig(checkpoint_dir=Path(checkpoints), models={args.model: model_dir}, weight_deltas=False)
        running, _ = await start_learner(config)
        replicas = [await start_replica(args, f"fanout-{i}", logs, model_dir, "torch") for i in range(REPLICAS)]
        try:
            async with open_channel(running.address) as channel:
                stub = learner_pb2_grpc.LearnerServiceStub(channel)
                created = await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=args.model))
                seq, versions = itertools.count(1), itertools.count(1)
                egress: dict[str, list[float]] = {}

                def publish(transport: str, count: int):
                    async def run() -> None:
                        reply = await stub.PublishWeights(
                            learner_pb2.PublishWeightsRequest(
                                session_id=created.session_id,
                                seq_id=next(seq),
                                targets=[common_pb2.WeightTarget(address=r.address) for r in replicas[:count]],
                                transport=transport,
                                version=next(versions),  # one counter: every replica only ever moves forward
                            )
                        )
                        egress.setdefault(f"{transport}/{count}", []).append(reply.egress_bytes / reply.num_bytes)
                        size[0] = reply.num_bytes

                    return run

                size = [0]
                await publish("direct", 1)()
                console.print(f"[bold]{args.model}[/]: {size[0] / MiB:.0f} MiB per replica, N = 1 and {REPLICAS}")
                cases = [
                    (f"{args.model} {transport} · N={count}", publish(transport, count), size[0])
                    for transport in ("stream", "direct")
                    for count in (1, REPLICAS)
                ]
                timings = await time_interleaved(cases, repeats)
            delta_timing, delta_bytes = await publish_after_steps(args, model_dir, replicas, versions, repeats)
        finally:
            for replica in replicas:
                await replica.stop()
            await running.stop(0)
    by_name = {t.name: t for t in timings}
    for timing in timings:
        transport, count = timing.name.split()[1], timing.name.rsplit("=", 1)[1]
        timing.extra["egress_per_model"] = egress[f"{transport}/{count}"]

    def scaling(transport: str, target: float | None) -> Ratio:
        one, many = by_name[f"{args.model} {transport} · N=1"], by_name[f"{args.model} {transport} · N={REPLICAS}"]
        meaning = f"PublishWeights({transport}) to {REPLICAS} replicas / to 1 (time)"
        return Ratio(f"{transport} publish N={REPLICAS} / N=1", many.median / one.median, meaning, target, False)

    def egress_ratio(transport: str, target: float | None) -> Ratio:
        values = egress[f"{transport}/{REPLICAS}"]
        meaning = f"learner egress bytes / model bytes, {transport} to {REPLICAS} replicas"
        return Ratio(f"{transport} egress N={REPLICAS} / model", max(values), meaning, target, False)

    raw = by_name[f"{args.model} stream · N={REPLICAS}"]
    delta_timing.name = f"{args.model} stream after a step (delta) · N={REPLICAS}"
    delta_timing.extra["egress_per_model"] = delta_bytes
    return [*timings, delta_timing], [
        scaling("stream", 1.5),
        scaling("direct", None),
        egress_ratio("stream", 1.1),
        egress_ratio("direct", None),
        Ratio(
            "delta bytes per sync / model",
            float(np.median(delta_bytes)),
            f"learner egress / model bytes, stream to {REPLICAS} replicas after each Adam step (lr {STEP_LR:g})",
        ),
        Ratio(
            "delta publish / raw publish",
            delta_timing.median / raw.median,
            f"PublishWeights(stream) to {REPLICAS} replicas after a step, deltas on / off (time)",
            None,
            False,
        ),
    ]


async def publish_after_steps(
    args: argparse.Namespace, model_dir: Path, replicas: list, versions, repeats: int
) -> tuple[Timing, list[float]]:
    """A learner with deltas on: an Adam step on an RL batch, then PublishWeights to every
    replica, timed (the step is not); the first publication is raw (nothing held yet) and not counted."""
    with tempfile.TemporaryDirectory(prefix="anvil-bench-learner-", dir=SHM) as checkpoints:
        config = LearnerConfig(checkpoint_dir=Path(checkpoints), models={args.model: model_dir}, weight_deltas=True)
        running, _ = await start_learner(config)
        try:
            async with open_channel(running.address) as channel:
                stub = learner_pb2_grpc.LearnerServiceStub(channel)
                created = await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=args.model, seed=0))
                rows = rl_rows(4, 64, created.info.vocab_size)
                seq, seconds, ratios = itertools.count(1), [], []
                for attempt in range(repeats + 1):
                    batch = {"arrow_ipc_stream": encode_batch(make_batch(rows))}
                    await stub.ForwardBackward(
                        learner_pb2.ForwardBackwardRequest(
                            session_id=created.session_id, seq_id=next(seq), batch=batch, loss_fn=LOSS
                        )
                    )
                    adam = common_pb2.AdamParams(learning_rate=STEP_LR)
                    await stub.OptimStep(
                        learner_pb2.OptimStepRequest(session_id=created.session_id, seq_id=next(seq), adam_params=adam)
                    )
                    start = time.perf_counter()
                    reply = await stub.PublishWeights(
                        learner_pb2.PublishWeightsRequest(
                            session_id=created.session_id,
                            seq_id=next(seq),
                            targets=[common_pb2.WeightTarget(address=r.address) for r in replicas],
                            version=next(versions),
                        )
                    )
                    if attempt:
                        seconds.append(time.perf_counter() - start)
                        ratios.append(reply.egress_bytes / reply.model_bytes)
        finally:
            await running.stop(0)
    return Timing("delta", seconds, reply.model_bytes), ratios


async def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.model, args.in_process = "anvil-tiny", True
    repeats = args.repeats or (2 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="anvil-bench-logs-") as logs:
        timings, ratios = await bench_fanout(args, Path(logs), repeats)
    console.print(timing_table("fan-out", timings))
    config = {"model": args.model, "replicas": REPLICAS, "repeats": repeats, "quick": args.quick}
    write_results("fanout", args.out, config, timings, ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("fanout", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-small", help="built-in model published by the learner")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per case (0: 3, or 2 with --quick)")
    parser.add_argument("--in-process", action="store_true", help="replicas in this process (--quick sets it)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
