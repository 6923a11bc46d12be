"""Real rollout servers (`python -m rollout` processes) on loopback, one per engine, shared per module.

vLLM is the default engine and the README set-up installs it; without it the vLLM cases skip, unless
ANVIL_EXPECT_VLLM=1 (CI sets it) promises it is there, in which case they fail.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
ENGINES = ["torch", "vllm"]


def start_rollout_process(model_dir: Path, engine: str) -> tuple[subprocess.Popen, str]:
    """A rollout server of `engine`; a vLLM one with full-vocabulary prompt logprobs (max_logprobs = -1),
    which target prompt logprobs need (tests/rollout/test_sampling.py)."""
    command = [sys.executable, "-m", "rollout", "--set", f'model="{model_dir}"', "--set", f'engine.type="{engine}"']
    if engine == "vllm":
        command += ["--set", "engine.max_logprobs=-1"]
    return start_process(command, engine)


def start_process(command: list[str], engine: str) -> tuple[subprocess.Popen, str]:
    """Start a rollout command and wait for its LISTENING line; fail with its exit code otherwise."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    for line in process.stdout:
        if line.startswith("LISTENING "):
            return process, line.split()[1]
    code = process.wait(timeout=30)
    raise AssertionError(f"rollout ({engine}) exited with {code} before listening")


def stop_process(process: subprocess.Popen) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="package", params=ENGINES)
def engine(request) -> str:
    if request.param == "vllm" and importlib.util.find_spec("vllm") is None:
        if os.environ.get("ANVIL_EXPECT_VLLM") == "1":
            pytest.fail("ANVIL_EXPECT_VLLM=1 but vllm is not installed (run scripts/setup.sh)")
        pytest.skip("vllm is not installed")
    return request.param


@pytest.fixture(scope="package")
def base_model(tiny_model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@dataclass
class Served:
    """What the shared server serves now; tests that change its weights record it here."""

    address: str
    model: torch.nn.Module
    version: int = 0


@pytest.fixture(scope="package")
def served(engine: str, tiny_model_dir: Path, base_model: torch.nn.Module) -> Iterator[Served]:
    """One rollout process per engine, shared by every test of this package."""
    process, address = start_rollout_process(tiny_model_dir, engine)
    yield Served(address, base_model)
    assert stop_process(process) == 0
