"""`anvil serve`: one HTTP port with Tinker's REST API and Fireworks-style service mode, over running or
locally started learner and rollout services.

This is the composition root, above both packages it mounts: `coordinator.gateway` (Tinker's `/api/v1`)
and `coordinator.service_mode` (deployments, RLOR trainer jobs, hot-load, completions, and the
`/training/v1/rlorTrainerJobs/...` prefix to each job's own gateway). `start_gateway` builds both and
binds the HTTP server (port 0 picks a free one); `serve` also starts the learner and rollout processes
that are not given by address (through `coordinator.services`, as `anvil run` does), prints
`LISTENING host:port`, and stops everything it started on SIGTERM / Ctrl-C: quietly, with one line and
exit status 0 (uvicorn is told to exit and finishes its own shutdown before anything is cancelled; the
app has no lifespan handlers, so uvicorn's lifespan task - whose cancellation it logs as a traceback - is
off).
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
from coordinator.gateway.checkpoint_routes import sweep_expired_forever
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.sampling_models import connect_sampling_models
from coordinator.gateway.service import TinkerService
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.models import resolve_model
from coordinator.service_mode.control import ServiceMode
from coordinator.service_mode.routes import TrainerGateway, control_router
from coordinator.services import Services, service_env, start_rollout_process, start_services
from coordinator.tokenizer_cache import install_served_tokenizer
from protos.channels import open_channel


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` (or the test) decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


SHUTDOWN_GRACE_S = 5.0
"""How long uvicorn may finish requests in flight (a long poll holds one up to `long_poll_s`)."""


@dataclass
class RunningGateway:
    address: str
    service: TinkerService
    server: uvicorn.Server
    control: ServiceMode
    serving: asyncio.Task
    """uvicorn's `serve()`; it returns once `should_exit` is set and its connections are closed."""
    tasks: list[asyncio.Task] = field(default_factory=list)

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(self.serving), SHUTDOWN_GRACE_S + 2)
        await self.control.stop()
        for task in [*self.tasks, self.serving]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.service.suspend("the server stopped")
        await self.service.router.close()
        await self.service.sampling.sampling_only.close()
        await self.service.learner_channel.close()


async def start_gateway(
    config: GatewayConfig,
    learner_address: str,
    rollout_addresses: list[str],
    services_api_key: str | None,
    learner_base_model: str | None = None,
    sampling_addresses: dict[str, list[str]] | None = None,
) -> RunningGateway:
    """Serve the REST API for `config.model` over the given learner and rollout services, and for each
    sampling-only model over its replicas (`sampling_addresses`, model name → addresses; by default the
    addresses `config.sampling_models` gives)."""
    model_dir = resolve_model(config.model)
    print(install_served_tokenizer(config.model, model_dir), flush=True)
    replicas = await ReplicaSet.connect(rollout_addresses, config.services.fleet, api_key=services_api_key)
    router = SnapshotRouter(replicas, model_dir)
    await router.start()
    if sampling_addresses is None:
        sampling_addresses = {m.model: m.rollout_addresses for m in config.sampling_models}
    for name in sampling_addresses:
        print(install_served_tokenizer(name, resolve_model(name)), flush=True)
    sampling_only = await connect_sampling_models(sampling_addresses, config.services.fleet, services_api_key)
    service = TinkerService(
        config,
        open_channel(learner_address, api_key=services_api_key),
        learner_base_model or config.model,
        model_dir,
        router,
        sampling_only=sampling_only,
    )
    restored = await service.restore()
    if restored.sessions:
        print(f"anvil serve: restored from {config.state_dir}: {restored}", flush=True)
    app = create_app(service, config.resolved_api_keys())
    app.include_router(fleet_router(replicas))
    control = ServiceMode(config, services_api_key)
    app.include_router(control_router(control))
    control.restore()
    server = _QuietServer(
        uvicorn.Config(
            TrainerGateway(app, control),
            host=config.host,
            port=config.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
            **config.uvicorn_tls(),
        )
    )
    serving = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises the bind error
            raise OSError(f"the gateway could not listen on {config.host}:{config.port}")
        await asyncio.sleep(0.02)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    loop = asyncio.get_running_loop()
    expiry = loop.create_task(service.sessions.expire_forever(config.session_timeout_s))
    sweep = loop.create_task(sweep_expired_forever(service.checkpoints))
    return RunningGateway(f"{host}:{port}", service, server, control, serving, [expiry, sweep])


STOPPING = "anvil serve: stopping; the services it started are stopped too"


async def start_sampling_replicas(config: GatewayConfig, services: Services) -> dict[str, list[str]]:
    """The replicas of each sampling-only model: its given addresses, or replicas started here (stopped
    with the other services; named sampler-<model>-<i>, and not restarted when they exit)."""
    addresses: dict[str, list[str]] = {}
    engine = config.services.rollout_engine.model_dump(exclude_none=True)
    logs, timeout = config.state_dir / "logs", config.services.startup_timeout_s
    for index, extra in enumerate(config.sampling_models):
        addresses[extra.model] = list(extra.rollout_addresses)
        for replica in range(0 if extra.rollout_addresses else extra.replicas):
            process = await start_rollout_process(
                f"sampler-{index}-{replica}", extra.model, resolve_model(extra.model), engine, logs,
                service_env(services.api_key), timeout, slot=config.services.rollout_replicas + replica,
            )  # fmt: skip
            services.processes.append(process)
            addresses[extra.model].append(process.address)
    services.write_record()
    return addresses


async def serve(config: GatewayConfig) -> None:
    """Start missing services, serve until SIGTERM / Ctrl-C, then stop what was started (returns normally)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main = asyncio.current_task()
    stop_requested = asyncio.Event()

    def on_sigterm() -> None:
        """SIGTERM (a scheduler, `kill`) stops like Ctrl-C: the `finally` blocks stop what was started.
        Only the first one cancels, so a second signal cannot interrupt that cleanup."""
        if not stop_requested.is_set():
            stop_requested.set()
            print(STOPPING, flush=True)
            main.cancel()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await _serve(config, stop_requested)
    except asyncio.CancelledError:
        if not stop_requested.is_set():
            raise
        main.uncancel()  # this cancellation was the SIGTERM stop, and it is done: exit normally
    finally:
        asyncio.get_running_loop().remove_signal_handler(signal.SIGTERM)


async def _serve(config: GatewayConfig, stop_requested: asyncio.Event) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(config.model)
    overrides = (f"max_sessions={config.learner_max_sessions}",)
    services_config = config.services
    if config.lora_max_rank:  # LoRA opted in: the learner serves it, vLLM replicas load adapters
        overrides += ("allow_lora=true",)
        engine = services_config.rollout_engine
        if engine.type == "vllm" and engine.max_lora_rank < config.lora_max_rank:
            engine = engine.model_copy(update={"max_lora_rank": config.lora_max_rank})
            services_config = services_config.model_copy(update={"rollout_engine": engine})
    services = await start_services(
        services_config, config.model, model_dir, config.state_dir, overrides, cluster=config.cluster
    )
    try:
        # A learner started here knows the model by its directory; a remote one by the configured name.
        learner_model = config.model if config.services.learner_address else str(model_dir)
        sampling_addresses = await start_sampling_replicas(config, services)
        running = await start_gateway(
            config, services.learner_address, services.rollout_addresses, services.api_key, learner_model,
            sampling_addresses,
        )  # fmt: skip
        # Replicas started here are restarted when they exit; they rejoin once they answer again.
        supervisor = services.supervise(running.service.router.replicas, config.services.fleet)
        print(f"LISTENING {running.address}", flush=True)
        scheme = "https" if config.tls_cert else "http"
        print(
            f"Tinker API for {config.model}: TINKER_BASE_URL={scheme}://{running.address} "
            f"TINKER_API_KEY={'<a configured key>' if config.resolved_api_keys() else 'tml-anything'}",
            flush=True,
        )
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            if not stop_requested.is_set():  # Ctrl-C; SIGTERM has said it already
                print(STOPPING, flush=True)
            raise
        finally:
            if supervisor is not None:
                await supervisor.close()
            await running.stop()
    finally:
        services.stop()
