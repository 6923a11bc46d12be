"""`anvil serve` stops quietly on SIGTERM: one "stopping" line, exit 0, no traceback (uvicorn's lifespan
task used to log a CancelledError). It runs over the package's learner and rollout, so it starts no
services of its own and stays cheap."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.coordinator.gateway.conftest import SERVICE_KEY, TINKER_KEY, Stack, start_anvil_serve


def test_sigterm_stops_anvil_serve_quietly(stack: Stack, tmp_path: Path, anvil_home: Path):
    process, address = start_anvil_serve(
        tmp_path,
        [
            "port=0",
            f'api_keys=["{TINKER_KEY}"]',
            f'state_dir="{tmp_path / "state"}"',
            f'services.learner_address="{stack.learner_address}"',
            f'services.rollout_addresses=["{stack.rollout_address}"]',
            f'services.api_key="{SERVICE_KEY}"',
        ],
    )
    try:
        headers = {"X-API-Key": TINKER_KEY}
        assert httpx.post(f"http://{address}/api/v1/create_session", json={}, headers=headers).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-3000:]
    assert "anvil serve: stopping" in log
    assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
