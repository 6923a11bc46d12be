"""How the weight stream cuts tensors into messages: nearly equal pieces vs full pieces plus a remainder.

`protos.weights_codec.piece_bounds` cuts each tensor into as few pieces as the chunk size allows, of
nearly equal size. Cutting full `chunk_bytes` pieces and sending the remainder last (the codec's scheme
before 2026-12-07) makes a stream whose messages alternate between 4 MiB and small ones, and grpc moved
such a stream markedly slower on the reference VM. This benchmark pushes the synthetic 0.5 B bf16 set
(Qwen2.5-0.5B's shapes) both ways to the same sink replica (the real receive path: PushWeights,
ChunkAssembler, hashing; bench/sink_rollout.py), prebuilt, in ABBA order, and reports the ratio.

    python -m bench.stream_chunking            # 0.5 B synthetic set, replica in its own process
    python -m bench.stream_chunking --quick    # 20 M set, replica in this process (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from bench.common import Ratio, Timing, base_parser, console, run_main, timing_table, write_results
from bench.publication import PUSH_METHOD, Replica, start_replica
from bench.sink_rollout import synthetic_shapes, synthetic_state_dict
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.weights_codec import DEFAULT_CHUNK_BYTES, framed_push_requests

VERSION = 1
"""Every push stages the same version (BeginWeightUpdate with rewind), so prebuilt requests can repeat."""


def full_pieces_then_remainder(total: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """The earlier cut: full `chunk_bytes` pieces, then whatever is left."""
    for start in range(0, max(total, 1), chunk_bytes):
        yield start, min(total, start + chunk_bytes)


async def push_prebuilt(replica: Replica, requests: list[bytes]) -> float:
    """Open an update, stream `requests`, abort it: the seconds the stream took."""
    async with open_channel(replica.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        await stub.BeginWeightUpdate(rollout_pb2.BeginWeightUpdateRequest(version=VERSION, rewind=True))
        start = time.perf_counter()
        await channel.stream_unary(PUSH_METHOD, request_serializer=None)(iter(requests))
        seconds = time.perf_counter() - start
        await stub.AbortWeightUpdate(rollout_pb2.AbortWeightUpdateRequest(version=VERSION))
    return seconds


async def main(args: argparse.Namespace) -> None:
    params = args.synthetic_params = 20_000_000 if args.quick else args.synthetic_params
    pairs = args.pairs or (2 if args.quick else 10)
    args.in_process = args.quick
    snapshot = sorted(tensors_as_bytes(synthetic_state_dict(synthetic_shapes(params)).items()), key=lambda t: t.name)
    size = sum(memoryview(t.data).nbytes for t in snapshot)
    cuts = {
        "equal pieces (piece_bounds)": [bytes(r) for r in framed_push_requests(VERSION, snapshot, args.chunk_bytes)],
        "full pieces + remainder": [
            bytes(r)
            for r in framed_push_requests(VERSION, snapshot, args.chunk_bytes, bounds=full_pieces_then_remainder)
        ],
    }
    console.print(f"{size / 2**20:.0f} MiB; messages: " + ", ".join(f"{k} {len(v)}" for k, v in cuts.items()))
    samples: dict[str, list[float]] = {name: [] for name in cuts}
    with tempfile.TemporaryDirectory(prefix="anvil-bench-logs-") as logs:
        replica = await start_replica(args, "sink", Path(logs))
        try:
            for requests in cuts.values():  # warm-up: the staging buffers' first touch
                await push_prebuilt(replica, requests)
            for pair in range(pairs):
                order = list(cuts) if pair % 2 == 0 else list(reversed(cuts))
                for name in order:
                    samples[name].append(await push_prebuilt(replica, cuts[name]))
        finally:
            await replica.stop()
    equal, remainder = (Timing(f"PushWeights stream, {name}", samples[name], size) for name in cuts)
    console.print(timing_table("stream chunking", [equal, remainder]))
    faster = sum(a < b for a, b in zip(equal.seconds, remainder.seconds, strict=True))
    ratios = [
        Ratio(
            "full+remainder / equal pieces (time)",
            remainder.median / equal.median,
            f"how much longer the earlier cut takes to stream the same bytes (equal pieces faster in {faster} of "
            f"{pairs} pairs)",
        )
    ]
    config = {"synthetic_params": params, "chunk_bytes": args.chunk_bytes, "pairs": pairs, "quick": args.quick}
    write_results("stream_chunking", args.out, config, [equal, remainder], ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("stream_chunking", __doc__.split("\n\n")[0])
    parser.add_argument("--synthetic-params", type=int, default=500_000_000, help="size of the synthetic bf16 set")
    parser.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="largest piece per message")
    parser.add_argument("--pairs", type=int, default=0, help="ABBA pairs timed (0: 10, or 2 with --quick)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
