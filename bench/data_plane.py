"""A ForwardBackward-sized trajectory batch from coordinator to learner, against raw gRPC of the same bytes.

The Anvil path, timed end to end: frame the per-datum numpy arrays as a serialised ForwardBackwardRequest
whose batch is their Arrow IPC stream (`protos.batch_encoding.request_bytes`: one copy of the values, the
same bytes a parser gets from `make_batch` + `encode_batch` + the protobuf message), send it over gRPC to
another process, which parses the request and runs the learner's own ingestion (the exactly-once
fingerprint, then `learner.batch.batch_from_arrow`: decode, `validate_batch`, per-datum arrays) and
answers. The baseline sends the same number of bytes as one raw gRPC bytes message to the same server process. The ratio
anvil / raw is the framing cost (target ≤ 1.15).

Each step is also timed on its own, in this process, so the table shows where the time goes. The
coordinator's Tinker `Datum` -> Arrow conversion (`coordinator.client.convert.datum_row` + `encode_rows`,
which starts from Python lists by Tinker's design) and the REST gateway path (the official SDK's protobuf
request over HTTP, through the gateway's own decoder to the learner's ingestion; `bench.rest_ingest_server`
stands in for a learner so the model is not timed) are reported beside it.

    python -m bench.data_plane             # 256 sequences x 2048 tokens
    python -m bench.data_plane --quick     # 16 x 256
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
    Ratio,
    Timing,
    base_parser,
    console,
    run_main,
    time_interleaved,
    time_sync,
    timing_table,
    write_results,
)
from bench.raw_grpc_server import INGEST_METHOD, UNARY_METHOD, VOCAB_ENV
from coordinator.launcher import start_service
from learner.batch import batch_from_arrow
from protos.anvil.v1 import learner_pb2
from protos.arrow_schemas import decode_batch, encode_batch, make_batch
from protos.batch_encoding import encode_rows, request_bytes
from protos.batch_request import batch_request_parser
from protos.batch_validation import validate_batch
from protos.channels import open_channel

VOCAB = 32000
PARSE = batch_request_parser(learner_pb2.ForwardBackwardRequest)


def trajectory_rows(sequences: int, tokens: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """RL rows as the coordinator makes them: tokens, sampler logprobs, advantages, sampler version."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(sequences):
        ids = rng.integers(0, VOCAB, tokens + 1, dtype=np.int32)
        rows.append(
            {
                "model_input": ids[:-1],
                "target_tokens": ids[1:],
                "logprobs": -rng.random(tokens, dtype=np.float32) * 5,
                "advantages": np.full(tokens, rng.standard_normal(), dtype=np.float32),
                "sampler_version": index // 16,
                "group_id": index // 8,
            }
        )
    return rows


def forward_backward_request(payload: bytes | None = None) -> learner_pb2.ForwardBackwardRequest:
    # The batch as a dict, built in place: a DataBatch message passed to the constructor is copied.
    batch = {"arrow_ipc_stream": payload} if payload is not None else None
    return learner_pb2.ForwardBackwardRequest(session_id="bench", seq_id=1, batch=batch, loss_fn="ppo")


def anvil_encode(rows: list[dict[str, np.ndarray]]) -> bytes:
    """Coordinator side: rows -> serialized ForwardBackwardRequest carrying their Arrow IPC stream."""
    return request_bytes(forward_backward_request(), rows)


def plain_encode(rows: list[dict[str, np.ndarray]]) -> bytes:
    """The same bytes (once parsed) by the plain path: Arrow table, IPC bytes, protobuf message, serialise."""
    return forward_backward_request(encode_batch(make_batch(rows))).SerializeToString()


def local_phases(rows: list[dict[str, np.ndarray]], repeats: int, num_bytes: int) -> list[Timing]:
    """Every step of the Anvil path, in this process, as a pipeline: each step works on the fresh output
    of the one before, as in a real call. (Timing one step in a loop on the same input reuses warm
    buffers and reports a fraction of its real cost: most of the cost here is filling new memory.)"""
    steps = {
        name: []
        for name in (
            "request_bytes (numpy rows -> request bytes)",
            "batch_request_parser (the learner's deserializer: the batch stays a view of the bytes)",
            "fingerprint (exactly-once: xxh3_128 of the request, its batch in place)",
            "validate_batch (decode + checks)",
            "batch_from_arrow (decode + checks + per-datum arrays)",
            "context: plain path (make_batch+encode_batch+message+SerializeToString)",
        )
    }
    timers = list(steps.values())
    for repeat in range(repeats + 1):  # the first pass warms up and is not kept
        marks = [time.perf_counter()]
        wire = anvil_encode(rows)
        marks.append(time.perf_counter())
        request = PARSE(wire)
        received = request.arrow_ipc_stream
        marks.append(time.perf_counter())
        request.fingerprint()
        marks.append(time.perf_counter())
        validate_batch(decode_batch(received), VOCAB)
        marks.append(time.perf_counter())
        batch_from_arrow(received, VOCAB)
        marks.append(time.perf_counter())
        plain_encode(rows)
        marks.append(time.perf_counter())
        if repeat:
            for timer, begin, end in zip(timers, marks, marks[1:], strict=False):
                timer.append(end - begin)
    return [Timing(f"phase: {name}", seconds, num_bytes) for name, seconds in steps.items()]


def datum_conversion(rows: list[dict[str, np.ndarray]], repeats: int, num_bytes: int) -> Timing:
    """The Tinker-typed client's conversion (Datum objects hold Python lists by Tinker's API)."""
    from coordinator.client.convert import datum_row
    from coordinator.client.types import Datum, ModelInput, TensorData

    data = [
        Datum(
            model_input=ModelInput.from_ints(row["model_input"].tolist()),
            loss_fn_inputs={
                "target_tokens": TensorData.from_numpy(row["target_tokens"].astype(np.int64)),
                "logprobs": TensorData.from_numpy(row["logprobs"]),
                "advantages": TensorData.from_numpy(row["advantages"]),
            },
        )
        for row in rows
    ]
    return time_sync(
        "context: coordinator Datum list -> Arrow IPC (datum_row + encode_rows)",
        lambda: encode_rows([datum_row(datum, index) for index, datum in enumerate(data)]),
        repeats,
        1,
        num_bytes,
    )


def tinker_request(rows: list[dict[str, np.ndarray]]) -> bytes:
    """The same batch as the official tinker SDK sends it: a protobuf ForwardBackwardRequest."""
    from protos.anvil.tinker.v1 import tinker_public_pb2 as tpb

    request = tpb.ForwardBackwardRequest(model_id="bench:train:0", seq_id=1, loss_fn="ppo")
    for row in rows:
        datum = request.data.add()
        datum.model_input.add().encoded_text.tokens = row["model_input"].astype(np.int32).tobytes()
        for key, values, code in (
            ("target_tokens", row["target_tokens"].astype(np.int64), tpb.DTYPE_INT64),
            ("logprobs", row["logprobs"], tpb.DTYPE_FLOAT32),
            ("advantages", row["advantages"], tpb.DTYPE_FLOAT32),
        ):
            tensor = datum.loss_fn_inputs[key]
            tensor.dense, tensor.dtype = values.tobytes(), code
            tensor.shape.append(len(values))
    return request.SerializeToString()


async def rest_gateway(rows, repeats: int, raw_send, num_bytes: int, logs: Path) -> list[Timing]:
    """Tinker protobuf over HTTP through the gateway's decoder to the learner's ingestion (no model),
    interleaved with the raw gRPC baseline so the two see the same machine load."""
    import httpx

    server = await start_service("rest-ingest", "bench.rest_ingest_server", [], logs, {VOCAB_ENV: str(VOCAB)}, 60)
    try:
        async with httpx.AsyncClient(base_url=f"http://{server.address}", timeout=120) as client:

            async def rest_send() -> None:
                reply = await client.post(
                    "/api/v1/forward_backward",
                    content=tinker_request(rows),
                    headers={"Content-Type": "application/x-protobuf"},
                )
                assert reply.json()["datums"] == len(rows)

            raw, rest = await time_interleaved(
                [
                    ("baseline (REST pairing): raw gRPC unary", raw_send, num_bytes),
                    ("rest: tinker proto encode+HTTP+gateway decode+Arrow+ingest", rest_send, num_bytes),
                ],
                repeats,
            )
    finally:
        server.stop()
    return [raw, rest]


async def main(args: argparse.Namespace) -> None:
    sequences, tokens = (16, 256) if args.quick else (args.sequences, args.tokens)
    repeats = args.repeats or (3 if args.quick else 7)
    rows = trajectory_rows(sequences, tokens)
    wire = anvil_encode(rows)
    num_bytes = len(wire)
    console.print(f"batch: {sequences} sequences x {tokens} tokens, {num_bytes / 2**20:.1f} MiB on the wire")

    with tempfile.TemporaryDirectory(prefix="anvil-bench-logs-") as logs:
        server = await start_service("raw-grpc", "bench.raw_grpc_server", [], Path(logs), {VOCAB_ENV: str(VOCAB)}, 60)
        try:
            async with open_channel(server.address) as channel:
                ingest = channel.unary_unary(INGEST_METHOD, request_serializer=None)
                unary = channel.unary_unary(UNARY_METHOD, request_serializer=None)
                same_size = b"\x01" * num_bytes

                async def anvil_send() -> None:
                    reply = await ingest(anvil_encode(rows))
                    assert int.from_bytes(reply, "little") == sequences

                async def prebuilt_send() -> None:
                    await ingest(wire)

                async def raw_send() -> None:
                    await unary(same_size)

                raw, anvil, prebuilt = await time_interleaved(
                    [
                        ("baseline: raw gRPC unary", raw_send, num_bytes),
                        ("anvil: request_bytes+send+decode+validate", anvil_send, num_bytes),
                        ("profile: anvil request prebuilt (send+decode+validate only)", prebuilt_send, num_bytes),
                    ],
                    repeats,
                )
                rest_timings = await rest_gateway(rows, repeats, raw_send, num_bytes, Path(logs))
        finally:
            server.stop()
    phases = local_phases(rows, repeats, num_bytes)
    context = [datum_conversion(rows, max(1, repeats // 2), num_bytes)]
    notes: list[str] = [
        "server ingestion decodes the Arrow batch where gRPC received it (protos.batch_request), as the learner "
        "does; what is left is gRPC's own copy of the message into a Python bytes object",
    ]

    timings = [raw, anvil, prebuilt, *phases, *context, *rest_timings]
    console.print(timing_table("data plane", timings))
    ratios = [
        Ratio(
            "anvil / raw gRPC (time)",
            anvil.median / raw.median,
            "Anvil batch path end to end vs a raw gRPC bytes message of the same size",
            1.15,
            higher_is_better=False,
        ),
        Ratio(
            "profile: client encode share",
            (anvil.median - prebuilt.median) / anvil.median,
            "of the Anvil path's time: building and encoding the request (anvil - prebuilt)",
        ),
        Ratio(
            "profile: server ingestion / raw gRPC (time)",
            prebuilt.median / raw.median,
            "the prebuilt request (parse + batch_from_arrow on the server) vs raw bytes of the same size",
        ),
        Ratio(
            "rest gateway / raw gRPC (time)",
            rest_timings[1].median / rest_timings[0].median,
            "the official SDK's protobuf request over HTTP through the gateway's decoder to the learner's "
            "ingestion (no model), vs raw gRPC bytes of the same size measured alongside it",
        ),
        Ratio(
            "rest gateway / anvil gRPC path (time)",
            rest_timings[1].median / anvil.median,
            "what the REST gateway adds on top of Anvil's own gRPC batch path",
        ),
        Ratio(
            "Datum conversion / anvil path (time)",
            context[0].median / anvil.median,
            "context: the Tinker-typed client's list->Arrow conversion vs the whole numpy-row path",
        ),
    ]
    config = {
        "sequences": sequences,
        "tokens": tokens,
        "wire_bytes": num_bytes,
        "repeats": repeats,
        "quick": args.quick,
    }
    write_results("data_plane", args.out, config, timings, ratios, notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("data_plane", __doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats (0: 7, or 3 with --quick)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
