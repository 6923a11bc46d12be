"""Faults injected at chosen points (servicekit.failpoints), on real processes: what survives, what is lost.

`anvil run` (torch rollout engine, 10 short steps, a checkpoint every 2) with its learner killed inside a
forward_backward, inside an optimizer step, halfway through writing a checkpoint and halfway through
sending a weight update, with its replica killed halfway through receiving one, and with the learner and
the replica hung (SIGSTOP) at those points - health checks must catch those, no call may wait forever:
every run finishes,
every batch is consumed exactly once (no prompt lost or repeated) and each step is recorded once.
The failpoint's marker file proves the fault really fired where it was meant to.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from servicekit.failpoints import ENV, ONCE_DIR_ENV
from tests.coordinator.test_run import ANVIL, REPO_ROOT, rows
from tests.coordinator.test_run_failures import SETTINGS, STEPS, assert_every_batch_once

WATCH = [
    "services.learner_watch.probe_interval_s=0.5",
    "services.learner_watch.probe_timeout_s=1",
    "services.learner_watch.failures_to_dead=3",
    "services.fleet.probe_interval_s=0.5",
    "services.fleet.hung_kill_after_s=3",
]


def run_with_failpoint(tmp_path: Path, failpoint: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """`anvil run` with `failpoint` armed once across its processes; (result, run dir, marker dir)."""
    run_dir, fired = tmp_path / "run", tmp_path / "fired"
    fired.mkdir()
    env = {**os.environ, ENV: failpoint, ONCE_DIR_ENV: str(fired)}
    arguments = [ANVIL, "run", "configs/copy_digit.toml", "--run-dir", str(run_dir)]
    for setting in [*SETTINGS, *WATCH]:
        arguments += ["--set", setting]
    result = subprocess.run(arguments, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    return result, run_dir, fired


@pytest.mark.integration
@pytest.mark.parametrize(
    ("failpoint", "recovery"),
    [
        ("learner.forward_backward=kill@5", "restarting it (1 of 3) to resume from the last checkpoint"),
        ("learner.optim_step=kill@5", "restarting it (1 of 3) to resume from the last checkpoint"),
        ("learner.checkpoint_write=kill@2", "restarting it (1 of 3) to resume from the last checkpoint"),
        ("weights.push_chunk=kill@100", "restarting it (1 of 3) to resume from the last checkpoint"),
        ("rollout.push=kill@100", "rollout replica-0 is back"),
        ("learner.optim_step=stop@5", "stopped answering (3 health checks unanswered"),
        ("rollout.push=stop@100", "has not answered for 3s although its process runs (hung or stopped)"),
    ],
    ids=[
        "learner mid forward_backward",
        "learner mid optim_step",
        "learner mid checkpoint write",
        "learner mid weight push",
        "replica mid weight push",
        "learner hung mid optim_step",
        "replica hung mid weight push",
    ],
)
def test_a_kill_at_a_chosen_point_loses_nothing(tmp_path: Path, failpoint: str, recovery: str, anvil_home):
    result, run_dir, fired = run_with_failpoint(tmp_path, failpoint)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert [p.name for p in fired.iterdir()] == [failpoint.split("=")[0]], "the failpoint fired, once"
    assert recovery in output, output[-4000:]
    assert_every_batch_once(run_dir)
    assert rows(run_dir)[-1]["weights/rollout_version_min"] == STEPS, "the replica serves the last step's weights"
    print(f"{failpoint}: {[line for line in result.stdout.splitlines() if 'resumed from' in line]}")
