"""The one place that starts (or connects to) learner and rollout service processes.

`anvil run` and `anvil serve` call `start_services` for their learner and rollout replicas; service mode
calls `start_learner_process` for each RLOR trainer job and `start_rollout_process` for each deployment
replica. Every process is `python -m learner|rollout` on loopback, started by `coordinator.launcher`, with
the same settings wherever it is started from (which is why they are built here and nowhere else): a
rollout replica serves the model directory under its name with the configured engine, a learner runs
the configured backend (Megatron as a torchrun group on this machine) and keeps its checkpoints where
the caller says.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.cluster.config import ClusterConfig
from coordinator.config import RunConfig, ServicesConfig
from coordinator.fleet.config import FleetConfig
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.fleet.supervisor import ReplicaSupervisor
from coordinator.launcher import ServiceHandle, start_service, toml_value
from learner.backends.megatron.world_size import ranks_per_node
from learner.config import BackendConfig, MegatronBackendConfig, TorchBackendConfig
from protos import tls
from servicekit.cpus import CPUS_ENV, format_cpu_list

SERVICES_FILE = "services.json"


def service_env(api_key: str | None) -> dict[str, str]:
    """Environment of a started service: offline Hugging Face, quiet vLLM, the key that protects it, and
    the TLS settings (protos.tls) - passed on explicitly, so services Ray starts on other nodes get them."""
    env = {"HF_HUB_OFFLINE": "1", "VLLM_LOGGING_LEVEL": "WARNING", **tls.environment()}
    if api_key:
        env["ANVIL_API_KEY"] = api_key
    return env


def replica_core(slot: int) -> int:
    """The core a local vLLM replica in `slot` is bound to (see start_rollout_process)."""
    return slot % (os.cpu_count() or 1)


async def start_rollout_process(
    name: str,
    model: str,
    model_dir: Path,
    engine: dict[str, Any],
    log_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    slot: int = 0,
    placement: Placement | None = None,
) -> ServiceHandle:
    """One rollout replica serving `model_dir` as `model` with `engine` settings (a dumped EngineConfig).

    `slot` is the replica's index among those on this host. vLLM's CPU build binds each replica's model
    thread to the first core unless told otherwise, so replicas on one host would share one core (and a
    restarting replica would start behind a busy one): replica `slot` gets core `slot mod cores` instead.
    (CUDA builds ignore the setting; an explicit VLLM_CPU_OMP_THREADS_BIND wins.)"""
    placement = placement or place_locally
    overrides = [f"model={toml_value(model_dir)}", f"model_name={toml_value(model)}"]
    overrides += [f"engine.{key}={toml_value(value)}" for key, value in engine.items()]
    if engine.get("type") == "vllm" and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env = {**env, "VLLM_CPU_OMP_THREADS_BIND": str(replica_core(slot))}
    return await placement("rollout", name, "rollout", overrides, log_dir, env, timeout_s)


async def start_learner_process(
    name: str,
    checkpoint_dir: Path,
    backend: BackendConfig,
    extra_overrides: tuple[str, ...],
    log_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    placement: Placement | None = None,
) -> ServiceHandle:
    """One learner with `backend` writing its checkpoints to `checkpoint_dir`: a process for the torch
    backend, a torchrun group of tp * pp * dp ranks on one machine for Megatron (rank 0 serves)."""
    placement = placement or place_locally
    overrides = [f"checkpoint_dir={toml_value(checkpoint_dir)}"]
    overrides += [f"backend.{key}={toml_value(value)}" for key, value in backend.model_dump(exclude_none=True).items()]
    overrides += extra_overrides
    ranks = megatron_ranks(backend) if isinstance(backend, MegatronBackendConfig) else 1
    return await placement("learner", name, "learner", overrides, log_dir, env, timeout_s, ranks)


Placement = Callable[..., Awaitable[ServiceHandle]]
"""Starts a service somewhere: (role, name, module, overrides, log_dir, env, timeout_s[, ranks]); a
learner of several ranks (Megatron) is one torch.distributed group whose rank 0 serves."""


async def place_locally(
    role: str,
    name: str,
    module: str,
    overrides: list[str],
    log_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    ranks: int = 1,
) -> ServiceHandle:
    """A process on this machine, on loopback; several ranks as one torchrun group."""
    if ranks > 1:
        wrapper, arguments = "learner.backends.megatron.torchrun", ("--nproc", str(ranks))
        return await start_service(name, wrapper, overrides, log_dir, env, timeout_s, arguments)
    return await start_service(name, module, overrides, log_dir, env, timeout_s)


def learner_cores_env(services_config: ServicesConfig, placement: Placement) -> dict[str, str]:
    """ANVIL_CPUS / OMP_NUM_THREADS keeping a local torch learner off the cores of the local vLLM
    replicas this run starts (replica i is bound to core i mod cores); {} when that does not apply."""
    engine = services_config.rollout_engine.model_dump(exclude_none=True)
    applies = (
        services_config.separate_cores
        and placement is place_locally
        and not services_config.rollout_addresses
        and engine.get("type") == "vllm"
        and isinstance(services_config.learner_backend, TorchBackendConfig)
        and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
        and CPUS_ENV not in os.environ
    )
    if not applies:
        return {}
    rollout = {replica_core(slot) for slot in range(services_config.rollout_replicas)}
    learner = [core for core in sorted(os.sched_getaffinity(0)) if core not in rollout]
    if not learner:
        return {}
    return {CPUS_ENV: format_cpu_list(learner), "OMP_NUM_THREADS": str(len(learner))}


def placement_for(cluster: ClusterConfig | None) -> Placement:
    """Where `[cluster]` says the services go: this machine, or the nodes of a Ray cluster."""
    if cluster is None or cluster.type == "local":
        return place_locally
    from coordinator.cluster.ray_placement import RayPlacement

    return RayPlacement(cluster).start


def megatron_ranks(backend: MegatronBackendConfig) -> int:
    """Ranks of a one-machine Megatron learner (what scripts/megatron_learner.sh would start)."""
    import torch

    gpus = torch.cuda.device_count() if backend.device != "cpu" else 0
    return ranks_per_node(backend.tp, backend.pp, backend.dp, gpus, nodes=1)


@dataclass
class Services:
    """The learner and rollout replicas a run or `anvil serve` talks to, and the processes it started."""

    learner_address: str
    rollout_addresses: list[str]
    api_key: str | None
    processes: list[ServiceHandle] = field(default_factory=list)
    start_rollout: Callable[[int], Awaitable[ServiceHandle]] | None = None
    """Starts rollout replica i again with its original settings (None: the replicas are not ours)."""
    start_learner: Callable[[], Awaitable[ServiceHandle]] | None = None
    """Starts the learner again with its original settings (None: the learner is not ours)."""
    record: Path | None = None
    """services.json: each started process's pid and address, kept current across restarts."""

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def write_record(self) -> None:
        if self.record is not None:
            processes = {p.name: {"pid": p.pid, "address": p.address} for p in self.processes}
            partial = self.record.with_suffix(".tmp")
            partial.write_text(json.dumps(processes, indent=1))
            partial.replace(self.record)  # readers never see a half-written record

    async def restart_learner(self) -> None:
        """Kill the learner this run started (its whole process group: it may be hung, or stopped) and start
        it again with the same settings and checkpoint directory; its new address replaces the old."""
        assert self.start_learner is not None, "only a learner this run started can be restarted"
        old = next(p for p in self.processes if p.name == "learner")
        old.kill_group()
        old.stop(timeout_s=10)
        process = await self.start_learner()
        self.processes = [process if p is old else p for p in self.processes]
        self.learner_address = process.address
        self.write_record()

    def supervise(self, replicas: ReplicaSet, config: FleetConfig) -> ReplicaSupervisor | None:
        """Restart the rollout replicas started here when they exit (replica-i is rollout-i)."""
        start_rollout = self.start_rollout
        if start_rollout is None:
            return None

        async def restart(name: str) -> ServiceHandle:
            index = int(name.rsplit("-", 1)[1])
            process = await start_rollout(index)
            self.processes = [process if p.name == process.name else p for p in self.processes]
            self.write_record()
            return process

        supervisor = ReplicaSupervisor(replicas, config, restart)
        for process in self.processes:
            if process.name.startswith("rollout-"):
                supervisor.watch(f"replica-{process.name.rsplit('-', 1)[1]}", process)
        return supervisor


async def launch_services(config: RunConfig, model_dir: Path, run_dir: Path) -> Services:
    """Connect to the run's services, starting whichever are not given (where `[cluster]` says)."""
    return await start_services(config.services, config.model, model_dir, run_dir, cluster=config.cluster)


async def start_services(
    services_config: ServicesConfig,
    model: str,
    model_dir: Path,
    run_dir: Path,
    learner_overrides: tuple[str, ...] = (),
    cluster: ClusterConfig | None = None,
) -> Services:
    """Connect to the configured services, starting whichever are not given: on loopback, or on the
    nodes of the Ray cluster `cluster` names."""
    api_key = services_config.api_key or os.environ.get("ANVIL_API_KEY")
    started = Services(services_config.learner_address or "", list(services_config.rollout_addresses), api_key)
    if services_config.learner_address and services_config.rollout_addresses:
        return started
    if not started.api_key and not (services_config.learner_address or services_config.rollout_addresses):
        # Everything is local: a fresh key protects it. (With a remote service and no configured key,
        # the local ones run without auth too, since the learner sends its own key when it publishes.)
        started.api_key = secrets.token_urlsafe(16)
    env = service_env(started.api_key)
    logs, timeout = run_dir / "logs", services_config.startup_timeout_s
    placement = placement_for(cluster)
    try:
        if not services_config.rollout_addresses:
            engine = services_config.rollout_engine.model_dump(exclude_none=True)

            async def start_rollout(index: int) -> ServiceHandle:
                return await start_rollout_process(
                    f"rollout-{index}", model, model_dir, engine, logs, env, timeout, slot=index, placement=placement
                )

            started.start_rollout = start_rollout
            for replica in range(services_config.rollout_replicas):
                process = await start_rollout(replica)
                started.processes.append(process)
                started.rollout_addresses.append(process.address)
        if not services_config.learner_address:
            backend = services_config.learner_backend
            learner_env = {**env, **learner_cores_env(services_config, placement)}

            async def start_learner() -> ServiceHandle:
                return await start_learner_process(
                    "learner", run_dir / "learner", backend, learner_overrides, logs, learner_env, timeout, placement
                )

            started.start_learner = start_learner
            process = await start_learner()
            started.processes.append(process)
            started.learner_address = process.address
    except BaseException:
        started.stop()
        raise
    started.record = run_dir / SERVICES_FILE
    started.write_record()
    return started
