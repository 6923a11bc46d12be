"""A Megatron learner placed by Ray: its two ranks in a placement group, one actor each, rendezvous from
Ray (not torchrun). A one-node Ray cluster on loopback; `anvil run` trains with it and publishes to a
rollout replica every step, and no rank outlives the run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.coordinator.test_run import anvil_run, rows, wait_gone
from tests.coordinator.test_run_megatron import SETTINGS
from tests.learner.megatron.needs import require_megatron

BIN = Path(sys.executable).parent
RAY_PORT = 6393
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    pytest.importorskip("ray", reason="the ray extra is not installed (scripts/setup.sh --dev installs it)")
    log = (tmp_path_factory.mktemp("ray") / "head.log").open("w")
    command = [str(BIN / "ray"), "start", "--head", "--block", f"--port={RAY_PORT}", "--num-cpus=3"]
    command += ["--node-ip-address=127.0.0.1", "--include-dashboard=false", "--disable-usage-stats"]
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV},
                            start_new_session=True)  # fmt: skip
    try:
        probe = f"import ray; ray.init(address='127.0.0.1:{RAY_PORT}', log_to_driver=False)"
        deadline = time.monotonic() + 120
        while subprocess.run([sys.executable, "-c", probe], env={**os.environ, **RAY_ENV}).returncode != 0:
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(2)
        yield f"127.0.0.1:{RAY_PORT}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        log.close()


def test_megatron_ranks_in_a_ray_placement_group(local_ray, tmp_path, anvil_home, monkeypatch):
    require_megatron()
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "ray-megatron"
    settings = [*SETTINGS, 'cluster.type="ray"', f'cluster.address="{local_ray}"']
    result = anvil_run(
        "configs/copy_digit.toml", "--run-dir", str(run_dir), *(a for s in settings for a in ("--set", s))
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "learner: megatron(tp=2,pp=1,dp=1)" in result.stdout
    assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]
    assert all(r["weights/rollout_version_min"] == r["step"] for r in rows(run_dir))
    logs = {path.name for path in (run_dir / "logs").iterdir()}
    assert {"learner.log", "learner-rank1.log"} <= logs, "each rank ran behind its own actor"
    assert wait_gone(processes_of(run_dir), timeout_s=60) == [], "no rank outlives the run"


def processes_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names the run directory (every service this run started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if str(run_dir).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found
