"""Boot the rollout service: build the engine from a RolloutConfig and serve it through protos.rpc."""

from __future__ import annotations

from protos.rpc import RunningServer, ServiceSpec, serve_until_signal, start_server
from rollout.config import RolloutConfig
from rollout.engines import build_engine
from rollout.service import RolloutServicer, add_rollout_service
from rollout.weights import WeightUpdater, checkpoint_shapes

SERVICE_NAME = "anvil.v1.RolloutService"


async def start_rollout(config: RolloutConfig) -> tuple[RunningServer, RolloutServicer]:
    model_path = config.model.expanduser().resolve()
    shapes = checkpoint_shapes(model_path)
    engine = await build_engine(config.engine, model_path)
    updater = WeightUpdater(engine, shapes)
    servicer = RolloutServicer(
        engine,
        updater,
        config.model_name or str(model_path),
        config.server.resolved_api_key(),
        config.max_samples_per_request,
    )
    spec = ServiceSpec(add_rollout_service, servicer, SERVICE_NAME)
    try:
        running = await start_server(config.server, [spec])
    except BaseException:
        await engine.close()
        raise
    return running, servicer


async def serve(config: RolloutConfig) -> None:
    running, servicer = await start_rollout(config)
    print(f"LISTENING {running.address}", flush=True)  # launchers read the bound port from this line
    await serve_until_signal(running, on_stop=None)
    await servicer.engine.close()
