"""A bare gRPC server for the baselines: bytes in, byte count out, no protobuf, no Anvil code - plus the
learner's batch ingestion behind the same server, so both data-plane paths cross the same boundary.

`python -m bench.raw_grpc_server` listens on 127.0.0.1:0, prints `LISTENING host:port` and serves

    /bench.Raw/Stream  client stream of raw bytes messages -> total length (8 bytes, little-endian)
    /bench.Raw/Unary   one raw bytes message              -> its length
    /bench.Raw/Ingest  a ForwardBackwardRequest            -> the datum count, after what the learner does
                       before its backend: its deserializer (`protos.batch_request`, the batch left in
                       place), the exactly-once fingerprint and `learner.batch.batch_from_arrow`
                       (decode + validate + arrays), nothing else

with the same message-size cap as Anvil's servers. It runs in its own process so the baselines pay the
same process boundary as a coordinator talking to a learner or a learner talking to a rollout replica.
"""

from __future__ import annotations

import asyncio
import os

import grpc

from protos.anvil.v1 import learner_pb2
from protos.batch_request import BatchRequest, batch_request_parser
from protos.channels import DEFAULT_MAX_MESSAGE_BYTES
from servicekit.process import die_with_parent

STREAM_METHOD = "/bench.Raw/Stream"
UNARY_METHOD = "/bench.Raw/Unary"
INGEST_METHOD = "/bench.Raw/Ingest"
VOCAB_ENV = "ANVIL_BENCH_VOCAB"
"""Vocabulary size the ingestion validates token ids against."""


async def _stream(request_iterator, context) -> bytes:
    total = 0
    async for message in request_iterator:
        total += len(message)
    return total.to_bytes(8, "little")


async def _unary(request: bytes, context) -> bytes:
    return len(request).to_bytes(8, "little")


async def _ingest(request: BatchRequest, context) -> bytes:
    from learner.batch import batch_from_arrow  # imported on first use: the byte baselines start faster

    request.fingerprint()
    batch = batch_from_arrow(request.arrow_ipc_stream, vocab_size=int(os.environ.get(VOCAB_ENV, "1048576")))
    return len(batch.data).to_bytes(8, "little")


async def serve() -> None:
    options = [
        ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ]
    server = grpc.aio.server(options=options)
    handlers = {
        "Stream": grpc.stream_unary_rpc_method_handler(_stream),
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Ingest": grpc.unary_unary_rpc_method_handler(
            _ingest, request_deserializer=batch_request_parser(learner_pb2.ForwardBackwardRequest)
        ),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"LISTENING 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    die_with_parent()  # started by coordinator.launcher: never outlive the benchmark
    asyncio.run(serve())
