"""Learner -> rollout weight publication, end to end and by phase, against memcpy, TCP and raw gRPC.

Two weight sets: the built-in `anvil-small` (float32, served by real rollout processes with the torch
and vLLM engines, published by a real learner's PublishWeights) and a synthetic ~0.5 B-parameter bf16
state dict with Qwen2.5-0.5B's shapes (served by `bench.sink_rollout`: the real RolloutServicer and
WeightUpdater over an engine that only holds the tensors). Transports: "stream" (Begin/Push/Commit
over gRPC, digest-checked; relayed replica to replica for several targets, bench/fanout.py's part),
"shm" (the learner writes one shared-memory segment, the replica maps and verifies it: the same-host
path) and "checkpoint" (SaveWeights into /dev/shm, then LoadWeights).

End to end = from the publish call until the replica answers that the new version is serving.
Phases of the stream (measured by running the same steps one after the other, so they add up to a
little more than the pipelined end to end): serialize (snapshot + chunk messages + digest), transfer
(PushWeights), stage (reassembly, digest check, tensors; the commit minus the swap), swap (the engine
takes the tensors). Checkpoint phases: write (safetensors into tmpfs) and load (LoadWeights).

    python -m bench.weight_sync            # anvil-small + 0.5 B synthetic, torch and vLLM engines
    python -m bench.weight_sync --quick    # anvil-tiny + a 15 M synthetic set, torch engine, replicas in process
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import math
import tempfile
from pathlib import Path

from bench.baselines import (
    DEFAULT_CHUNK,
    loopback_tcp,
    memcpy,
    raw_grpc_server,
    raw_stream_name,
    raw_stream_sender,
)
from bench.common import (
    MiB,
    Ratio,
    Timing,
    base_parser,
    console,
    run_main,
    throughput_ratio,
    time_async,
    time_interleaved,
    timing_table,
    with_cpu_accounting,
    write_results,
)
from bench.fanout import bench_fanout
from bench.publication import (
    SHM,
    Replica,
    checkpoint_phases,
    e2e_stream_direct,
    nbytes,
    repeat_phases,
    shm_publish,
    start_replica,
    stream_phases,
)
from bench.publication_profile import component_costs, cpu_table
from bench.sink_rollout import synthetic_shapes, synthetic_state_dict
from coordinator.launcher import ServiceProcess
from coordinator.models import resolve_model
from learner.config import LearnerConfig
from learner.server import start_learner
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.channels import open_channel


async def bench_synthetic(
    args, logs: Path, raw_server: ServiceProcess, repeats: int
) -> tuple[list[Timing], list[Ratio]]:
    shapes = synthetic_shapes(args.synthetic_params)
    state = synthetic_state_dict(shapes)
    named = list(state.items())
    size = nbytes(state.values())
    params = sum(math.prod(s) for s in shapes.values())
    label = f"synthetic {params / 1e6:.0f}M bf16"
    console.print(f"[bold]{label}[/]: {size / MiB:.0f} MiB, {len(shapes)} tensors")

    baselines = [memcpy(size, repeats), loopback_tcp(size, repeats)]
    for timing in baselines:  # the model part has its own memcpy row: keep names unique
        timing.name = f"{label} · {timing.name}"
    memcpy_timing = baselines[0]

    replica = await start_replica(args, "sink", logs)
    try:
        phased_total, phases = await repeat_phases(
            f"{label} stream", repeats, lambda: stream_phases(replica, named, args.chunk_bytes), size
        )
        raw_cpu: dict[str, list[float]] = {}
        e2e_cpu: dict[str, list[float]] = {}
        async with open_channel(raw_server.address) as raw_channel:
            raw, e2e = await time_interleaved(
                [
                    (
                        f"{label} · {raw_stream_name(args.chunk_bytes)}",
                        with_cpu_accounting(
                            raw_stream_sender(raw_channel, size, args.chunk_bytes),
                            {"sender": None, "receiver": raw_server.pid},
                            raw_cpu,
                        ),
                        size,
                    ),
                    (
                        f"{label} stream · end to end",
                        with_cpu_accounting(
                            lambda: e2e_stream_direct(replica, named, args.chunk_bytes),
                            {"sender": None, "receiver": replica.pid},
                            e2e_cpu,
                        ),
                        size,
                    ),
                ],
                repeats,
            )
        baselines.append(raw)
        cpu_profile = cpu_table(raw_cpu, e2e_cpu, raw, e2e, replica.pid is not None)
        with tempfile.TemporaryDirectory(prefix="anvil-bench-ckpt-", dir=SHM) as shm:
            counter = itertools.count()
            ckpt_total, ckpt_phases = await repeat_phases(
                f"{label} checkpoint (tmpfs)",
                repeats,
                lambda: checkpoint_phases(replica, state, Path(shm) / f"v{next(counter)}"),
                size,
            )
            shm_e2e = await time_async(
                f"{label} shm · end to end", lambda: shm_publish(replica, named, Path(shm)), repeats, num_bytes=size
            )
    finally:
        await replica.stop()

    transport = Timing(
        f"{label} stream · transport (serialize+transfer+stage)",
        [
            s + t + g
            for s, t, g in zip(
                phases["serialize"].seconds, phases["transfer"].seconds, phases["stage"].seconds, strict=True
            )
        ],
        size,
    )
    profile = component_costs(state, size, repeats)
    timings = [*baselines, e2e, phased_total, *phases.values(), transport, ckpt_total, *ckpt_phases.values(), shm_e2e]
    timings += profile
    ratios = [
        throughput_ratio(
            "synthetic stream e2e / raw gRPC", e2e, raw, "stream publication end to end vs raw gRPC bytes stream", 0.8
        ),
        throughput_ratio(
            "synthetic stream transport / raw gRPC",
            transport,
            raw,
            "serialize+transfer+stage (no engine swap) vs raw gRPC bytes stream",
            None,
        ),
        throughput_ratio(
            "synthetic shm e2e / memcpy",
            shm_e2e,
            memcpy_timing,
            "same-host path (one write into a shared segment, the replica maps, verifies and swaps) vs memcpy",
            0.5,
        ),
        throughput_ratio(
            "synthetic checkpoint(tmpfs) e2e / memcpy",
            ckpt_total,
            memcpy_timing,
            "context: the older same-host path (SaveWeights->tmpfs->LoadWeights) vs one memcpy",
            None,
        ),
        throughput_ratio("raw gRPC / memcpy", raw, memcpy_timing, "context: the gRPC floor vs memory", None),
        throughput_ratio(
            "sha256 / raw gRPC", profile[0], raw, "profile: the digest alone vs the wire (each side hashes once)", None
        ),
        throughput_ratio("loopback TCP / memcpy", baselines[1], memcpy_timing, "context", None),
    ]
    e2e.extra["cpu_s_per_publication"] = cpu_profile.get("anvil")
    raw.extra["cpu_s_per_publication"] = cpu_profile.get("raw")
    return timings, ratios


async def bench_model(
    args, logs: Path, raw_address: str, repeats: int, engines: list[str]
) -> tuple[list[Timing], list[Ratio]]:
    model_dir = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="anvil-bench-learner-", dir=SHM) as checkpoints:
        # Deltas off: the same weights are published again and again, which a delta would send as zeros.
        config = LearnerConfig(checkpoint_dir=Path(checkpoints), models={args.model: model_dir}, weight_deltas=False)
        running, servicer = await start_learner(config)
        try:
            async with open_channel(running.address) as channel:
                stub = learner_pb2_grpc.LearnerServiceStub(channel)
                session_id = (
                    await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=args.model))
                ).session_id
                backend = servicer.sessions.get(session_id).backend
                named = list(backend.named_weights())
                size = nbytes(t for _, t in named)
                console.print(f"[bold]{args.model}[/]: {size / MiB:.0f} MiB float32, {len(named)} tensors")
                memcpy_timing = memcpy(size, repeats)
                memcpy_timing.name = f"{args.model} · {memcpy_timing.name}"
                timings, ratios = [memcpy_timing], []
                seq = itertools.count(1)
                for engine in engines:
                    replica = await start_replica(args, f"rollout-{engine}", logs, model_dir, engine)
                    label = f"{args.model} → {engine}"
                    try:
                        _, phases = await repeat_phases(
                            f"{label} stream",
                            repeats,
                            lambda r=replica: stream_phases(r, named, args.chunk_bytes),
                            size,
                        )

                        async def publish(transport: str, r: Replica = replica) -> None:
                            request = learner_pb2.PublishWeightsRequest(
                                session_id=session_id,
                                seq_id=next(seq),
                                targets=[common_pb2.WeightTarget(address=r.address)],
                                transport=transport,
                                version=r.next_version(),
                            )
                            await stub.PublishWeights(request)

                        async with open_channel(raw_address) as raw_channel:
                            raw, stream = await time_interleaved(
                                [
                                    (
                                        f"{label} · {raw_stream_name(args.chunk_bytes)}",
                                        raw_stream_sender(raw_channel, size, args.chunk_bytes),
                                        size,
                                    ),
                                    (f"{label} stream · PublishWeights e2e", lambda: publish("stream"), size),
                                ],
                                repeats,
                            )
                        ckpt = await time_async(
                            f"{label} checkpoint(tmpfs) · PublishWeights e2e",
                            lambda: publish("checkpoint"),
                            repeats,
                            num_bytes=size,
                        )
                        shm = await time_async(
                            f"{label} shm · PublishWeights e2e", lambda: publish("shm"), repeats, num_bytes=size
                        )
                    finally:
                        await replica.stop()
                    timings += [raw, stream, *phases.values(), ckpt, shm]
                    ratios += [
                        throughput_ratio(
                            f"{label} stream e2e / raw gRPC", stream, raw, "PublishWeights(stream) vs raw gRPC", None
                        ),
                        throughput_ratio(
                            f"{label} shm e2e / memcpy", shm, memcpy_timing, "PublishWeights(shm) vs memcpy", None
                        ),
                        throughput_ratio(
                            f"{label} checkpoint e2e / memcpy",
                            ckpt,
                            memcpy_timing,
                            "PublishWeights(checkpoint, tmpfs) vs memcpy",
                            None,
                        ),
                    ]
        finally:
            await running.stop(0)
    return timings, ratios


async def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.model, args.synthetic_params = "anvil-tiny", min(args.synthetic_params, 16_000_000)
        args.in_process = True
    repeats = args.repeats or (2 if args.quick else 3)
    engines = args.engines or (["torch"] if args.quick else ["torch", "vllm"])
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        engines.remove("vllm")
        console.print("[yellow]vllm is not installed: the vLLM engine is left out[/]")
    timings: list[Timing] = []
    ratios: list[Ratio] = []
    with tempfile.TemporaryDirectory(prefix="anvil-bench-logs-") as logs:
        async with raw_grpc_server() as raw_server:
            for part in (
                bench_synthetic(args, Path(logs), raw_server, repeats),
                bench_model(args, Path(logs), raw_server.address, repeats, engines),
                bench_fanout(args, Path(logs), repeats),  # one learner, N = 1 and 3 replicas: relay vs direct
            ):
                more_timings, more_ratios = await part
                timings += more_timings
                ratios += more_ratios
    console.print(timing_table("weight sync", timings))
    config = {
        "model": args.model,
        "synthetic_params": args.synthetic_params,
        "chunk_bytes": args.chunk_bytes,
        "repeats": repeats,
        "engines": engines,
        "quick": args.quick,
        "in_process": args.in_process,
    }
    write_results("weight_sync", args.out, config, timings, ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("weight_sync", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-small", help="built-in model published by the learner")
    parser.add_argument("--synthetic-params", type=int, default=500_000_000, help="size of the synthetic bf16 set")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK, help="stream chunk size (and raw baseline's)")
    parser.add_argument(
        "--repeats", type=int, default=0, help="timed repeats per measurement (0: 3, or 2 with --quick)"
    )
    parser.add_argument(
        "--in-process", action="store_true", help="replicas in this process, not their own (--quick sets it)"
    )
    parser.add_argument("--engines", nargs="*", choices=["torch", "vllm"], help="rollout engines for the model")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
