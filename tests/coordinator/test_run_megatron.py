"""`anvil run` starts the learner its config names: Megatron TP=2 as a torchrun group of two ranks on this
machine (`services.learner_backend`), with no launcher script. The run trains, publishes to its rollout
every step, and leaves no rank behind; a killed coordinator takes the whole group with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from tests.coordinator.fleet.test_fleet_run import descendants
from tests.coordinator.test_run import ANVIL, REPO_ROOT, anvil_run, rows, wait_gone
from tests.learner.megatron.needs import require_megatron

STEPS = 3
SETTINGS = [
    f"loop.steps={STEPS}",
    "loop.groups_per_batch=4",
    "loop.group_size=4",
    "loop.checkpoint_every=0",
    'services.rollout_engine.type="torch"',
    'services.learner_backend.type="megatron"',
    "services.learner_backend.tp=2",
    'services.learner_backend.device="cpu"',
]


def arguments(run_dir) -> list[str]:
    return ["configs/copy_digit.toml", "--run-dir", str(run_dir), *(a for s in SETTINGS for a in ("--set", s))]


def test_a_run_with_a_megatron_learner_group(tmp_path, anvil_home):
    require_megatron()
    run_dir = tmp_path / "megatron"
    result = anvil_run(*arguments(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "learner: megatron(tp=2,pp=1,dp=1)" in result.stdout
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert all(r["weights/rollout_version_min"] == r["step"] for r in metrics), "weights reached rollout each step"
    learner = json.loads((run_dir / "services.json").read_text())["learner"]["pid"]
    assert wait_gone([learner], timeout_s=30) == []


def test_a_killed_coordinator_takes_the_rank_group_with_it(tmp_path, anvil_home):
    require_megatron()
    run_dir = tmp_path / "killed"
    command = [ANVIL, "run", *arguments(run_dir), "--set", "loop.steps=200"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
            assert process.poll() is None, "the run ended before its first step"
            time.sleep(0.5)
        learner = json.loads((run_dir / "services.json").read_text())["learner"]["pid"]
        ranks = descendants(learner)
        assert len([pid for pid in ranks if "learner" in _command(pid)]) >= 2, "two ranks under the launcher"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert wait_gone([learner, *ranks], timeout_s=60) == [], "no rank outlives the coordinator"
    finally:
        if process.poll() is None:
            process.kill()


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_the_learner_backend_comes_from_the_run_config():
    from coordinator.config import RunConfig
    from learner.config import MegatronBackendConfig, TorchBackendConfig
    from servicekit.config import load_config

    megatron = load_config(RunConfig, None, SETTINGS[-3:])
    assert megatron.services.learner_backend == MegatronBackendConfig(tp=2, device="cpu")
    assert RunConfig().services.learner_backend == TorchBackendConfig()
    legacy = load_config(RunConfig, None, ['services.learner_device="cpu"'])  # the field before learner_backend
    assert legacy.services.learner_backend == TorchBackendConfig(device="cpu")
    short = load_config(RunConfig, None, ['learner.backend="megatron"', "learner.tp=2"])  # the [learner] table
    assert short.services.learner_backend == MegatronBackendConfig(tp=2)
