"""`python -m learner` and `anvil learner` start a real server process that trains and stops cleanly."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protos.channels import open_channel
from tests.learner.client import LearnerTestClient, random_rows

REPO_ROOT = Path(__file__).resolve().parents[2]


def start(command: list[str], tmp_path: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            *command,
            "--config",
            "configs/learner.toml",
            "--set",
            "server.port=0",
            "--set",
            f'checkpoint_dir="{tmp_path}"',
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in process.stdout:
        if line.startswith("LISTENING "):
            return process, line.split()[1]
    process.wait(timeout=10)
    raise AssertionError(f"learner did not start: {process.stderr.read()}")


def stop(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=30)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([sys.executable, "-m", "learner"], id="python -m learner"),
        pytest.param([str(Path(sys.executable).parent / "anvil"), "learner"], id="anvil learner"),
    ],
)
async def test_learner_process_serves_and_stops(command, tmp_path, tiny_model_dir):
    base_model = str(tiny_model_dir) if "-m" in command else "anvil-tiny"  # anvil learner registers the name
    process, address = start(command, tmp_path)
    try:
        async with open_channel(address) as channel:
            client = await LearnerTestClient.create(channel, servicer=None, base_model=base_model)
            _, metrics = await client.forward_backward(random_rows(512))
            reply = await client.optim_step(learning_rate=1e-3)
            assert reply.step == 1 and "loss:sum" in metrics
            saved = await client.save_state("from-process")
            assert Path(saved.path).is_relative_to(tmp_path)
    finally:
        code = await asyncio.to_thread(stop, process)
    assert code == 0, process.stderr.read()


def test_bad_config_is_reported(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "learner", "--set", "max_sessions=0"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "max_sessions" in result.stderr
