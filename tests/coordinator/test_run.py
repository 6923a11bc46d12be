"""`anvil run` end to end on loopback: learner + vLLM rollout + coordinator as real processes.

One uninterrupted run is shared by the checks below (reward rises, staleness bound, rollout version,
clean shutdown, run-directory contents); the resume test kills a second run's coordinator mid-run,
resumes it, and compares the prompts consumed with the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ANVIL = str(Path(sys.executable).parent / "anvil")
STEPS = 32
OVERRIDES = [  # configs/copy_digit.toml, shortened, with a larger learning rate so a rise shows within 32 steps
    f"loop.steps={STEPS}",
    "loop.checkpoint_every=4",
    "loop.groups_per_batch=32",
    "loop.group_size=16",
    "loop.adam.learning_rate=3e-3",
]


def anvil_run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    command = [ANVIL, "run", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def overrides() -> list[str]:
    return [arg for override in OVERRIDES for arg in ("--set", override)]


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent's reaper) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout_s: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, anvil_home) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "uninterrupted"
    result = anvil_run("configs/copy_digit.toml", "--run-dir", str(run_dir), *overrides())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_reward_rises(uninterrupted):
    metrics = rows(uninterrupted)
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    first = sum(r["reward/mean"] for r in metrics[:4]) / 4  # about 1/512: a random policy
    last = sum(r["reward/mean"] for r in metrics[-4:]) / 4
    assert last >= 0.02 and last > 3 * first, (first, last)


def test_every_sample_respects_the_staleness_bound(uninterrupted):
    bound = json.loads((uninterrupted / "config.json").read_text())["loop"]["max_off_policy_steps"]
    assert all(r["staleness/max"] <= bound for r in rows(uninterrupted))


def test_rollout_serves_version_n_after_step_n(uninterrupted):
    assert all(r["weights/rollout_version_min"] == r["step"] for r in rows(uninterrupted))


def test_shutdown_leaves_no_process_behind(uninterrupted):
    services = json.loads((uninterrupted / "services.json").read_text())
    assert {"learner", "rollout-0"} <= set(services)
    assert wait_gone([s["pid"] for s in services.values()], timeout_s=5) == []


def test_run_directory_has_config_metrics_plot_and_checkpoints(uninterrupted):
    assert json.loads((uninterrupted / "config.json").read_text())["model"] == "anvil-tiny"
    assert (uninterrupted / "curves.png").stat().st_size > 1000
    checkpoints = rows(uninterrupted, "checkpoints.jsonl")
    assert [c["step"] for c in checkpoints] == list(range(4, STEPS + 1, 4))
    assert all((Path(c["path"]) / "COMPLETE").is_file() for c in checkpoints)
    assert {"time/weight_sync_s", "kl_sample_train/v1", "entropy/sampler_estimate", "tokens/per_s"} <= set(
        rows(uninterrupted)[-1]
    )


def test_resume_after_a_kill_loses_and_repeats_no_prompt(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [ANVIL, "run", "configs/copy_digit.toml", "--run-dir", str(run_dir), *overrides()],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 600
    metrics_path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= 10:
            break
        assert process.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    services = json.loads((run_dir / "services.json").read_text())
    assert wait_gone([s["pid"] for s in services.values()]) == [], "services must die with their coordinator"
    killed_at = rows(run_dir)[-1]["step"]
    assert killed_at < STEPS

    result = anvil_run("--resume", str(run_dir))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from step" in result.stdout

    consumed = rows(run_dir, "consumed.jsonl")
    batches = [c["batch"] for c in consumed]
    assert batches == list(range(STEPS)), "each batch consumed exactly once, in order"
    problems = [p for c in consumed for p in c["problems"]]
    assert len(problems) == len(set(problems)), "no prompt repeated"
    reference = {p for c in rows(uninterrupted, "consumed.jsonl") for p in c["problems"]}
    assert set(problems) == reference, "no prompt lost"
    assert [r["step"] for r in rows(run_dir)] == list(range(1, STEPS + 1))


@pytest.mark.parametrize(
    ("settings", "expected_metric"),
    [
        (['loop.objective={type="dpo", beta=0.1}'], "dpo/pairs"),
        (['loop.objective.type="ppo"', "loop.objective.tis_cap=2.0", "loop.max_off_policy_steps=0"], "tis/weight_mean"),
        (
            ['loop.objective={type="custom", loss="coordinator.objectives.custom_losses:importance_sampling"}'],
            "loss/sum",
        ),
    ],
    ids=["online DPO via forward_backward_custom", "ppo with truncated importance sampling", "a custom loss"],
)
def test_other_objectives_run(tmp_path, settings, expected_metric):
    """Short runs on the torch rollout engine: the objectives wire through end to end."""
    run_dir = tmp_path / "objective"
    arguments = ["configs/copy_digit.toml", "--run-dir", str(run_dir)]
    for setting in [*settings, "loop.steps=4", "loop.checkpoint_every=0", 'services.rollout_engine.type="torch"']:
        arguments += ["--set", setting]
    result = anvil_run(*arguments)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = rows(run_dir)
    assert len(metrics) == 4
    assert all(expected_metric in r for r in metrics)
    if expected_metric == "tis/weight_mean":
        assert all(r["staleness/max"] == 0 for r in metrics)
        # the learner reports its own throughput and memory per step (token-budget micro-batches)
        assert all(r["learner/tokens_per_s"] > 0 and r["learner/peak_memory_gib"] > 0 for r in metrics)
        assert all(r["learner/micro_batches"] >= 1 for r in metrics)


def test_run_connects_to_a_running_learner(tmp_path, tiny_model_dir):
    """A learner started separately (here without auth); the run starts only the rollout it lacks."""
    checkpoints = tmp_path / "learner"
    learner = subprocess.Popen(
        [sys.executable, "-m", "learner", "--set", "server.port=0", "--set", f'checkpoint_dir="{checkpoints}"'],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={k: v for k, v in os.environ.items() if k != "ANVIL_API_KEY"},
    )  # fmt: skip
    try:
        address = next(line.split()[1] for line in learner.stdout if line.startswith("LISTENING "))
        run_dir = tmp_path / "connected"
        arguments = ["configs/copy_digit.toml", "--run-dir", str(run_dir)]
        for setting in [
            "loop.steps=3",
            "loop.checkpoint_every=0",
            f'services.learner_address="{address}"',
            'services.rollout_engine.type="torch"',
            f'model="{tiny_model_dir}"',
        ]:
            arguments += ["--set", setting]
        result = anvil_run(*arguments)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert [r["step"] for r in rows(run_dir)] == [1, 2, 3]
        assert set(json.loads((run_dir / "services.json").read_text())) == {"rollout-0"}
        assert learner.poll() is None, "a learner the run did not start keeps running"
    finally:
        learner.send_signal(signal.SIGTERM)
        learner.wait(timeout=60)
