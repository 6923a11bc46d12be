"""A real learner, a real rollout (torch engine) and the gateway, each on loopback, on a private event-loop
thread; tests drive the gateway with the unmodified `tinker` SDK from the test thread."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.tenancy import acting_as, tenant_of_key
from coordinator.serve import start_gateway
from learner.config import LearnerConfig
from learner.server import start_learner
from protos.rpc import ServerConfig
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout
from tests.coordinator.conftest import ThreadedServers

SERVICE_KEY = "gateway-test-service-key"
TINKER_KEY = "tml-gateway-test"
OTHER_TENANT_KEY = "tml-gateway-other-tenant"
"""A second key the shared gateway accepts: another tenant (tests/coordinator/gateway/test_tenants.py)."""


class Stack:
    """Handles of the running stack, for tests that look behind the REST API."""

    def __init__(
        self, threaded: ThreadedServers, gateway, learner, learner_address: str, rollout_address: str = ""
    ) -> None:
        self.threaded, self.gateway, self.learner, self.learner_address = threaded, gateway, learner, learner_address
        self.rollout_address = rollout_address
        self.base_url = f"http://{gateway.address}"

    def as_tenant(self, key: str = TINKER_KEY):
        """Look behind the REST API as the tenant of `key` (the gateway shows each tenant its own only)."""
        return acting_as(tenant_of_key(key))

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.threaded.loop).result(timeout)


def rollout_config(model_dir: Path) -> RolloutConfig:
    """A torch-engine replica of anvil-tiny with the stack's service key."""
    return RolloutConfig(
        model=model_dir,
        model_name="anvil-tiny",
        server=ServerConfig(api_key=SERVICE_KEY),
        engine=TorchEngineConfig(device="cpu"),
    )


def build_stack(tmp: Path, model_dir: Path, **gateway_settings) -> Stack:
    threaded = ThreadedServers()
    learner_address, learner = threaded.start(
        start_learner(
            LearnerConfig(
                server=ServerConfig(api_key=SERVICE_KEY),
                checkpoint_dir=tmp / "learner",
                max_sessions=24,
                models={"anvil-tiny": model_dir},
            )
        )
    )
    rollout_address, _ = threaded.start(start_rollout(rollout_config(model_dir)))
    keys = [TINKER_KEY, OTHER_TENANT_KEY]
    config = GatewayConfig(port=0, api_keys=keys, state_dir=tmp / "gateway", **gateway_settings)
    gateway = asyncio.run_coroutine_threadsafe(
        start_gateway(config, learner_address, [rollout_address], SERVICE_KEY), threaded.loop
    ).result(60)
    return Stack(threaded, gateway, learner, learner_address, rollout_address)


def stop_stack(stack: Stack) -> None:
    stack.run(stack.gateway.stop())
    stack.threaded.close()


@pytest.fixture(scope="package")
def stack(tiny_model_dir: Path, tmp_path_factory) -> Iterator[Stack]:
    running = build_stack(
        tmp_path_factory.mktemp("gateway"), tiny_model_dir, fwdbwd_max_chunk_len=3, max_request_bytes=4 * 2**20
    )
    yield running
    stop_stack(running)


@pytest.fixture(scope="package")
def service_client(stack: Stack):
    import tinker

    client = tinker.ServiceClient(base_url=stack.base_url, api_key=TINKER_KEY)
    yield client
    client.close("success").result()


def fleet_serve_settings(key: str, state_dir: Path, engine: str) -> list[str]:
    """`anvil serve` with two rollout replicas of `engine` watched closely (quick failover and restart)."""
    return [
        "port=0", f'api_keys=["{key}"]', f'state_dir="{state_dir}"', "services.rollout_replicas=2",
        f'services.rollout_engine.type="{engine}"', "services.fleet.probe_interval_s=0.5",
        "services.fleet.failures_to_dead=2", "services.fleet.restart_backoff_s=0.5",
    ]  # fmt: skip


def start_anvil_serve(
    tmp_path: Path, settings: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`python -m coordinator serve` with `--set` settings (and `env` added to its environment), its output
    in tmp_path/serve.log; returns the process and the address from its LISTENING line (fails with the
    log's tail if it never listens)."""
    command = [sys.executable, "-m", "coordinator", "serve"]
    for setting in settings:
        command += ["--set", setting]
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + 300
    address = None
    while address is None and time.monotonic() < deadline and process.poll() is None:
        lines = log_path.read_text().splitlines()
        address = next((line.split()[1] for line in lines if line.startswith("LISTENING ")), None)
        time.sleep(0.5)
    if address is None:
        process.kill()
        raise AssertionError(log_path.read_text()[-3000:])
    return process, address


def pid_alive(pid: int) -> bool:
    """Whether process `pid` is still running (a zombie, exited but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def stop_anvil_serve(process: subprocess.Popen, tmp_path: Path, services: dict) -> None:
    """SIGTERM `anvil serve`: it exits 0, and no process of its `services.json` outlives it."""
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for name, entry in services.items():
        assert not pid_alive(entry["pid"]), f"{name} (pid {entry['pid']}) outlived anvil serve"
