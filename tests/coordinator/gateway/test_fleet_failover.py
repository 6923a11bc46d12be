"""The official tinker SDK keeps sampling through `anvil serve` while one of its two rollout replicas is
killed (kill -9): samples move to the other replica, the killed one is restarted and serves again; then
a replica is added and another removed while serving (`anvil replicas`). Torch-engine replicas keep this
quick; tests/coordinator/fleet/test_fleet_run.py kills and stops real vLLM replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

from tests.coordinator.conftest import wait  # noqa: E402
from tests.coordinator.gateway.conftest import fleet_serve_settings, pid_alive, start_anvil_serve  # noqa: E402
from tests.rollout.conftest import start_rollout_process  # noqa: E402

KEY = "tml-fleet-test"
ANVIL = str(Path(sys.executable).parent / "anvil")


def _listing(address: str) -> urllib.request.Request:
    return urllib.request.Request(f"http://{address}/anvil/v1/replicas", headers={"X-API-Key": KEY})


@pytest.mark.integration
def test_sampling_goes_on_while_a_replica_is_killed_and_restarted(tmp_path: Path, anvil_home: Path, tiny_model_dir):
    state = tmp_path / "state"
    process, address = start_anvil_serve(tmp_path, fleet_serve_settings(KEY, state, "torch"))
    try:
        killed = json.loads((state / "services.json").read_text())["rollout-0"]["pid"]

        client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
        sampler = client.create_sampling_client(base_model="anvil-tiny").result()
        prompt = types.ModelInput.from_ints([4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5])

        def sample_many(count: int) -> list:
            futures = [
                sampler.sample(prompt, 2, types.SamplingParams(max_tokens=4, seed=seed)) for seed in range(count)
            ]
            return [future.result(timeout=120) for future in futures]

        assert len(sample_many(8)) == 8
        os.kill(killed, signal.SIGKILL)
        answered = sample_many(24)  # while replica 0 is dead and restarting: every sample still answers
        assert all(len(response.sequences) == 2 for response in answered)

        restart_deadline = time.monotonic() + 240
        while time.monotonic() < restart_deadline:
            services = json.loads((state / "services.json").read_text())
            if services["rollout-0"]["pid"] != killed:
                break
            time.sleep(0.5)
        else:
            raise AssertionError("replica 0 was not restarted: " + (tmp_path / "serve.log").read_text()[-3000:])
        assert all(len(response.sequences) == 2 for response in sample_many(16))
        assert "restarting it" in (tmp_path / "serve.log").read_text()

        # Replicas added and removed while serving, with the CLI.
        def replicas(*action: str) -> dict[str, dict]:
            shown = subprocess.run(
                [ANVIL, "replicas", *action, "--server", f"http://{address}", "--api-key", KEY],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert shown.returncode == 0, shown.stdout + shown.stderr
            listing = json.loads(urllib.request.urlopen(_listing(address)).read())["replicas"]
            return {r["name"]: r for r in listing}

        extra, extra_address = start_rollout_process(tiny_model_dir, "torch")
        try:
            assert replicas("add", extra_address, "--name", "extra")["extra"]["state"] in {"healthy", "stale"}
            wait(lambda: replicas("list")["extra"]["state"] == "healthy", "the added replica to serve")
            removed_pid = json.loads((state / "services.json").read_text())["rollout-1"]["pid"]
            assert set(replicas("remove", "replica-1")) == {"replica-0", "extra"}
            wait(lambda: not pid_alive(removed_pid), "the removed replica's process to stop")
            assert all(len(response.sequences) == 2 for response in sample_many(8))
            assert replicas("list")["extra"]["in_flight"] == 0
        finally:
            extra.terminate()
            extra.wait(timeout=60)
        client.close("success").result()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
