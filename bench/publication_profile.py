"""The profile of a weight publication: what each streamed byte costs beyond the raw transfer (single-core
throughput of the digest, of copies, of protobuf parsing) and the CPU seconds each side spends."""

from __future__ import annotations

import hashlib
import statistics

import torch
from rich.table import Table

from bench.baselines import DEFAULT_CHUNK
from bench.common import Timing, console, time_sync
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import rollout_pb2
from protos.weights_codec import framed_push_requests


def component_costs(state: dict[str, torch.Tensor], size: int, repeats: int) -> list[Timing]:
    """Single-core throughput of the work every streamed byte needs beyond the raw transfer (the profile)."""
    views = [memoryview(t.view(torch.uint8).numpy()) for t in state.values()]

    def sha256_all() -> None:
        hasher = hashlib.sha256()
        for view in views:
            hasher.update(view)

    def copy_into_fresh_memory() -> None:
        for view in views:
            for offset in range(0, len(view), DEFAULT_CHUNK):
                bytes(view[offset : offset + DEFAULT_CHUNK])

    wire = next(
        framed_push_requests(1, tensors_as_bytes([max(state.items(), key=lambda kv: kv[1].numel())]), DEFAULT_CHUNK)
    )
    parse_repeats = max(1, size // len(wire))

    def parse_chunks() -> None:
        for _ in range(parse_repeats):
            rollout_pb2.PushWeightsRequest.FromString(wire).chunk.data  # noqa: B018 - the read is the cost

    return [
        time_sync("profile: sha256 (one core)", sha256_all, repeats, 0, size),
        time_sync("profile: copy into fresh 4 MiB buffers", copy_into_fresh_memory, repeats, 0, size),
        time_sync("profile: protobuf parse + read of chunk data", parse_chunks, repeats, 0, parse_repeats * len(wire)),
    ]


def cpu_table(
    raw_cpu: dict[str, list[float]], e2e_cpu: dict[str, list[float]], raw: Timing, e2e: Timing, separate: bool
) -> dict[str, dict[str, float]]:
    """Median CPU seconds of sender and receiver per publication: the profile that says what bounds it."""
    if not separate:
        return {}
    profile = {}
    table = Table(title="CPU seconds per publication (sender = this process, receiver = the server process)")
    for column in ("path", "wall", "sender CPU", "receiver CPU", "total CPU", "cores busy"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, cpu, timing in (("raw", raw_cpu, raw), ("anvil", e2e_cpu, e2e)):
        sender, receiver = statistics.median(cpu["sender"]), statistics.median(cpu["receiver"])
        profile[name] = {"sender_s": sender, "receiver_s": receiver, "wall_s": timing.median}
        total = sender + receiver
        table.add_row(
            name,
            f"{timing.median:.3f}",
            f"{sender:.3f}",
            f"{receiver:.3f}",
            f"{total:.3f}",
            f"{total / timing.median:.2f}",
        )
    console.print(table)
    return profile
