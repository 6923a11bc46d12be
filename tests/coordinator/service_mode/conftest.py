"""`anvil serve` as a real process (torch rollout engine, for speed), driven by the unmodified
`fireworks-ai` 1.2.30 training SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

KEY = "fw-service-mode-test"
OTHER_TENANT_KEY = "fw-service-mode-other-tenant"
"""A second key every `anvil serve` here accepts: another tenant (test_tenants.py)."""


@dataclass
class Serve:
    process: subprocess.Popen
    base_url: str
    state_dir: Path
    log: Path

    def children(self) -> set[int]:
        found = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return {int(pid) for pid in found.stdout.split()}

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def start_serve(workdir: Path, state_dir: Path, *settings: str) -> Serve:
    """`anvil serve` with a torch rollout engine and `settings` (more `--set` overrides)."""
    log = workdir / f"serve-{time.monotonic_ns()}.log"
    command = [
        sys.executable, "-m", "coordinator", "serve", "--set", "port=0",
        "--set", f'api_keys=["{KEY}", "{OTHER_TENANT_KEY}"]',
        "--set", f'state_dir="{state_dir}"', "--set", 'services.rollout_engine.type="torch"',
    ]  # fmt: skip
    for setting in settings:
        command += ["--set", setting]
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        lines = log.read_text().splitlines()
        address = next((line.split()[1] for line in lines if line.startswith("LISTENING ")), None)
        if address:
            return Serve(process, f"http://{address}", state_dir, log)
        time.sleep(0.3)
    process.kill()
    raise AssertionError(f"anvil serve did not start:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="package")
def serve(tmp_path_factory, anvil_home) -> Iterator[Serve]:
    pytest.importorskip("fireworks.training.sdk", reason="fireworks-ai[training-sdk]==1.2.30 is a dev dependency")
    workdir = tmp_path_factory.mktemp("fireworks-serve")
    running = start_serve(workdir, workdir / "state")
    yield running
    assert running.stop() == 0, running.log.read_text()[-3000:]


def trained_policy(serve: Serve, prompt: list[int], learning_rate: float):
    """An RLOR trainer job on `serve`, its Tinker training client, and one cross_entropy step on `prompt`
    (so its weights differ from the base model's): (trainers, endpoint, service client, policy, data)."""
    import fireworks.training.sdk as fw

    trainers = fw.TrainerJobManager(api_key=KEY, base_url=serve.base_url)
    endpoint = trainers.create_and_wait(fw.TrainerJobConfig(base_model="anvil-tiny", lora_rank=0))
    service = fw.FiretitanServiceClient(base_url=endpoint.base_url, api_key=KEY)
    policy = service.create_training_client(base_model="anvil-tiny", lora_rank=0)
    data = [fw.Datum(model_input=fw.ModelInput.from_ints(prompt[:-1]),
                     loss_fn_inputs={"target_tokens": prompt[1:], "weights": [1.0] * (len(prompt) - 1)})]  # fmt: skip
    policy.forward_backward(data, "cross_entropy").result()
    policy.optim_step(fw.AdamParams(learning_rate=learning_rate)).result()
    return trainers, endpoint, service, policy, data
