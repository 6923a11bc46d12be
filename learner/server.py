"""Boot the learner: build the servicer from a LearnerConfig and serve it through protos.rpc."""

from __future__ import annotations

from learner.config import LearnerConfig
from learner.service import LearnerServicer
from protos.anvil.v1 import learner_pb2_grpc
from protos.rpc import RunningServer, ServiceSpec, serve_until_signal, start_server

SERVICE_NAME = "anvil.v1.LearnerService"


async def start_learner(config: LearnerConfig) -> tuple[RunningServer, LearnerServicer]:
    servicer = LearnerServicer(config)
    spec = ServiceSpec(learner_pb2_grpc.add_LearnerServiceServicer_to_server, servicer, SERVICE_NAME)
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
