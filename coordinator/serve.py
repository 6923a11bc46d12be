"""`anvil serve`: one HTTP port with Tinker's REST API and Fireworks-style service mode, over running or
locally started learner and rollout services.

This is the composition root, above both packages it mounts: `coordinator.gateway` (Tinker's `/api/v1`)
and `coordinator.service_mode` (deployments, RLOR trainer jobs, hot-load, completions, and the
`/training/v1/rlorTrainerJobs/...` prefix to each job's own gateway). `start_gateway` builds both and
binds the HTTP server (port 0 picks a free one); `serve` also starts the learner and rollout processes
that are not given by address (through `coordinator.services`, as `anvil run` does), prints
`LISTENING host:port`, and stops everything it started on SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass, field

import uvicorn

from coordinator.fleet.replica_set import ReplicaSet
from coordinator.fleet.routes import fleet_router
from coordinator.gateway.app import create_app
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.service import TinkerService
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.models import resolve_model
from coordinator.service_mode.control import ServiceMode
from coordinator.service_mode.routes import TrainerGateway, control_router
from coordinator.services import start_services
from protos.channels import open_channel


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` (or the test) decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


@dataclass
class RunningGateway:
    address: str
    service: TinkerService
    server: uvicorn.Server
    control: ServiceMode
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.control.stop()
        for task in self.tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.service.sessions.finish_all("the server stopped")
        await self.service.router.close()
        await self.service.learner_channel.close()


async def start_gateway(
    config: GatewayConfig,
    learner_address: str,
    rollout_addresses: list[str],
    services_api_key: str | None,
    learner_base_model: str | None = None,
) -> RunningGateway:
    """Serve the REST API for `config.model` over the given learner and rollout services."""
    model_dir = resolve_model(config.model)
    replicas = await ReplicaSet.connect(rollout_addresses, config.services.fleet, api_key=services_api_key)
    router = SnapshotRouter(replicas, model_dir)
    await router.start()
    service = TinkerService(
        config,
        open_channel(learner_address, api_key=services_api_key),
        learner_base_model or config.model,
        model_dir,
        router,
    )
    app = create_app(service, config.resolved_api_keys())
    app.include_router(fleet_router(replicas))
    control = ServiceMode(config, services_api_key)
    app.include_router(control_router(control))
    control.restore()
    server = _QuietServer(
        uvicorn.Config(TrainerGateway(app, control), host=config.host, port=config.port, log_level="warning")
    )
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises the bind error
            raise OSError(f"the gateway could not listen on {config.host}:{config.port}")
        await asyncio.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    expiry = asyncio.get_running_loop().create_task(service.sessions.expire_forever(config.session_timeout_s))
    return RunningGateway(f"{host}:{port}", service, server, control, [expiry, serving])


async def serve(config: GatewayConfig) -> None:
    """Start missing services, serve until cancelled, then stop what was started."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # SIGTERM (a scheduler, `kill`) stops like Ctrl-C: the `finally` blocks stop what was started.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    config.state_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(config.model)
    overrides = (f"max_sessions={config.learner_max_sessions}",)
    services = await start_services(config.services, config.model, model_dir, config.state_dir, overrides)
    try:
        # A learner started here knows the model by its directory; a remote one by the configured name.
        learner_model = config.model if config.services.learner_address else str(model_dir)
        running = await start_gateway(
            config, services.learner_address, services.rollout_addresses, services.api_key, learner_model
        )
        # Replicas started here are restarted when they exit; they rejoin once they answer again.
        supervisor = services.supervise(running.service.router.replicas, config.services.fleet)
        print(f"LISTENING {running.address}", flush=True)
        print(
            f"Tinker API for {config.model}: TINKER_BASE_URL=http://{running.address} "
            f"TINKER_API_KEY={'<a configured key>' if config.resolved_api_keys() else 'tml-anything'}",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            print("anvil serve: stopping; the services it started are stopped too", flush=True)
        finally:
            if supervisor is not None:
                await supervisor.close()
            await running.stop()
    finally:
        services.stop()
