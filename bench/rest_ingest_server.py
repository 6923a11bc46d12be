"""The REST gateway's request path with a learner stand-in: Tinker's protobuf ForwardBackwardRequest over
HTTP into the gateway's own decoder, on to the Arrow batch the gateway sends the learner, and the learner's
ingestion of it - everything but the model.

`python -m bench.rest_ingest_server` listens on 127.0.0.1:0 (uvicorn, like `anvil serve`), prints
`LISTENING host:port` and serves `POST /api/v1/forward_backward` -> {"datums": n}, running
`coordinator.gateway.wire.forward_call_from_proto` + `ForwardCall.rows`, `make_batch` + `encode_batch`
(what the gateway hands to the learner's gRPC stub) and `learner.batch.batch_from_arrow`.
"""

from __future__ import annotations

import asyncio
import os

import uvicorn
from fastapi import FastAPI, Request

from bench.raw_grpc_server import VOCAB_ENV
from coordinator.gateway.wire import forward_call_from_proto
from learner.batch import batch_from_arrow
from protos.arrow_schemas import encode_batch, make_batch
from servicekit.process import die_with_parent

app = FastAPI()


@app.post("/api/v1/forward_backward")
async def forward_backward(request: Request) -> dict[str, int]:
    rows, _ = forward_call_from_proto(await request.body()).rows()
    batch = batch_from_arrow(encode_batch(make_batch(rows)), int(os.environ.get(VOCAB_ENV, "32000")))
    return {"datums": len(batch.data)}


async def serve() -> None:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    print(f"LISTENING 127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", flush=True)
    await serving


if __name__ == "__main__":
    die_with_parent()  # started by coordinator.launcher: never outlive the benchmark
    asyncio.run(serve())
