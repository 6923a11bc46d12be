"""The official tinker SDK keeps sampling through `anvil serve` while one of its two rollout replicas is
killed (kill -9): samples move to the other replica, the killed one is restarted and serves again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

KEY = "tml-fleet-test"


@pytest.mark.integration
def test_sampling_goes_on_while_a_replica_is_killed_and_restarted(tmp_path: Path, anvil_home: Path):
    state = tmp_path / "state"
    log = (tmp_path / "serve.log").open("w")
    settings = [
        "port=0", f'api_keys=["{KEY}"]', f'state_dir="{state}"', "services.rollout_replicas=2",
        'services.rollout_engine.type="torch"', "services.fleet.probe_interval_s=0.5",
        "services.fleet.failures_to_dead=2", "services.fleet.restart_backoff_s=0.5",
    ]  # fmt: skip
    command = [sys.executable, "-m", "coordinator", "serve"]
    for setting in settings:
        command += ["--set", setting]
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    try:
        deadline = time.monotonic() + 300
        address = None
        while address is None and time.monotonic() < deadline and process.poll() is None:
            lines = (tmp_path / "serve.log").read_text().splitlines()
            address = next((line.split()[1] for line in lines if line.startswith("LISTENING ")), None)
            time.sleep(0.5)
        assert address, (tmp_path / "serve.log").read_text()[-3000:]
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
        client.close("success").result()
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=120)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
