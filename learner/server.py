"""Boot the learner: build the servicer from a LearnerConfig and serve it through protos.rpc."""

from __future__ import annotations

from learner.config import LearnerConfig
from learner.service import LearnerServicer
from protos.anvil.v1 import learner_pb2, learner_pb2_grpc
from protos.batch_request import batch_request_parser
from protos.registration import with_request_deserializers
from protos.rpc import RunningServer, ServiceSpec, serve_until_signal, start_server

SERVICE_NAME = "anvil.v1.LearnerService"
add_learner_service = with_request_deserializers(
    learner_pb2_grpc.add_LearnerServiceServicer_to_server,
    SERVICE_NAME,
    {
        "Forward": batch_request_parser(learner_pb2.ForwardRequest),
        "ForwardBackward": batch_request_parser(learner_pb2.ForwardBackwardRequest),
    },
)
"""The generated registration, except that the batch-carrying requests keep their Arrow bytes as a view
of the received message (protos.batch_request): no copy of the batch before Arrow decodes it."""


async def start_learner(config: LearnerConfig) -> tuple[RunningServer, LearnerServicer]:
    servicer = LearnerServicer(config)
    spec = ServiceSpec(add_learner_service, servicer, SERVICE_NAME)
    return await start_server(config.server, [spec]), servicer


async def serve(config: LearnerConfig) -> None:
    if config.backend.type == "megatron":  # torchrun ranks: rank 0 serves, the others follow it
        from learner.backends.megatron.launch import serve_ranks

        await serve_ranks(config, _serve)
        return
    await _serve(config)


async def _serve(config: LearnerConfig) -> None:
    running, _ = await start_learner(config)
    print(f"LISTENING {running.address}", flush=True)  # launchers read the bound port from this line
    await serve_until_signal(running)
