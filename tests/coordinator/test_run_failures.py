"""`anvil run` when a service dies mid-run, and resuming past a corrupt checkpoint.

Real processes, cheap settings (the torch rollout engine, 4 groups of 4 one-token samples per step):
- a run's learner is kill -9'd after two checkpoints, or SIGSTOPped (hung): the run restarts it, reloads
  the last checkpoint, rewinds the replicas to it, and finishes with every batch consumed exactly once;
- with learner restarts disabled, the kill ends the run with one line naming the learner and the resume
  command (exit 2). That run is then resumed with its newest checkpoint truncated: the resume skips it,
  says so, continues from the one before, and every batch is consumed exactly once;
- a run that loses its only rollout replica (restarts disabled) ends the same way.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from learner.checkpoint import COMPLETE_MARKER
from tests.coordinator.test_run import ANVIL, REPO_ROOT, anvil_run, rows, wait_gone

STEPS = 10
GROUPS = 4
SETTINGS = [
    f"loop.steps={STEPS}",
    "loop.checkpoint_every=2",
    f"loop.groups_per_batch={GROUPS}",
    "loop.group_size=4",
    'services.rollout_engine.type="torch"',
]


@dataclass
class EndedRun:
    run_dir: Path
    returncode: int
    stdout: str
    stderr: str
    services: dict


def run_and_kill(
    run_dir: Path, service: str, after_checkpoints: int, *settings: str, signal_name: str = "KILL"
) -> EndedRun:
    """Start `anvil run`, send `service` SIG<signal_name> once `after_checkpoints` checkpoints exist, and
    wait for the run to end."""
    arguments = ["configs/copy_digit.toml", "--run-dir", str(run_dir)]
    for setting in [*SETTINGS, *settings]:
        arguments += ["--set", setting]
    run_dir.mkdir(parents=True)
    out, err = run_dir.with_suffix(".out"), run_dir.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen([ANVIL, "run", *arguments], cwd=REPO_ROOT, stdout=stdout, stderr=stderr)
        try:
            deadline = time.monotonic() + 300
            while len(_complete_checkpoints(run_dir)) < after_checkpoints:
                assert process.poll() is None, f"the run ended before the kill: {err.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no checkpoint in time"
                time.sleep(0.1)
            services = json.loads((run_dir / "services.json").read_text())
            subprocess.run(["kill", f"-{signal_name}", str(services[service]["pid"])], check=True)
            returncode = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    return EndedRun(run_dir, returncode, out.read_text(), err.read_text(), services)


def _complete_checkpoints(run_dir: Path) -> list[dict]:
    """Recorded checkpoints whose files are written (they are written in the background after the record)."""
    recorded = [json.loads(line) for line in _lines(run_dir / "checkpoints.jsonl")]
    return [c for c in recorded if (Path(c["path"]) / COMPLETE_MARKER).exists()]


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def assert_one_line_failure(ended: EndedRun, starts_with: str) -> str:
    """Exit 2, no traceback, and a last line naming the service and the exact resume command."""
    assert ended.returncode == 2, ended.stderr[-3000:]
    assert "Traceback" not in ended.stderr + ended.stdout
    assert "ExceptionGroup" not in ended.stderr + ended.stdout
    last = _lines_of(ended.stderr)[-1]
    assert last.startswith(f"anvil run: {starts_with}"), last
    assert last.endswith(f"anvil run --resume {ended.run_dir}"), last
    assert wait_gone([s["pid"] for s in ended.services.values()], timeout_s=10) == []
    return last


def _lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def learner_killed(tmp_path_factory, anvil_home) -> EndedRun:
    run_dir = tmp_path_factory.mktemp("failures") / "learner-killed"
    return run_and_kill(run_dir, "learner", 2, "services.learner_watch.restarts=0")


def test_a_killed_learner_ends_the_run_with_one_line(learner_killed):
    last = assert_one_line_failure(learner_killed, "the learner was killed by SIGKILL")
    assert "logs/learner.log" in last
    print(last)


def assert_every_batch_once(run_dir: Path) -> None:
    consumed = rows(run_dir, "consumed.jsonl")
    assert [c["batch"] for c in consumed] == list(range(STEPS)), "each batch consumed exactly once, in order"
    problems = [p for c in consumed for p in c["problems"]]
    assert sorted(problems) == list(range(STEPS * GROUPS)), "no prompt lost or repeated"
    assert [r["step"] for r in rows(run_dir)] == list(range(1, STEPS + 1))


@pytest.mark.parametrize("signal_name", ["KILL", "STOP"])
def test_a_failed_learner_is_restarted_and_the_run_resumes_from_its_last_checkpoint(tmp_path, signal_name):
    watch = ["services.learner_watch.probe_interval_s=0.5", "services.learner_watch.probe_timeout_s=1",
             "services.learner_watch.failures_to_dead=3"]  # fmt: skip
    ended = run_and_kill(tmp_path / "restarted", "learner", 2, *watch, signal_name=signal_name)
    assert ended.returncode == 0, ended.stdout[-3000:] + ended.stderr[-3000:]
    failed = "was killed by SIGKILL" if signal_name == "KILL" else "stopped answering (3 health checks unanswered"
    assert failed in ended.stdout and "restarting it (1 of 3) to resume from the last checkpoint" in ended.stdout
    resumed = next(line for line in _lines_of(ended.stdout) if line.startswith("resumed from step "))
    assert int(resumed.split()[3]) >= 2, resumed
    assert_every_batch_once(ended.run_dir)
    assert [c["step"] for c in rows(ended.run_dir, "checkpoints.jsonl")] == list(range(2, STEPS + 1, 2))
    old = ended.services["learner"]["pid"]
    now = json.loads((ended.run_dir / "services.json").read_text())
    assert now["learner"]["pid"] != old, "a new learner process"
    assert wait_gone([old], timeout_s=10) == [], "the failed (or stopped) learner was killed"
    metrics = rows(ended.run_dir)
    assert metrics[-1]["weights/rollout_version_min"] == STEPS, "the replica was rewound, then followed"


def test_resume_skips_a_corrupt_newest_checkpoint(learner_killed):
    run_dir = learner_killed.run_dir
    checkpoints = _complete_checkpoints(run_dir)  # a newer one cut short by the kill does not verify either
    newest, previous = checkpoints[-1], checkpoints[-2]
    weights = Path(newest["path"]) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    result = anvil_run("--resume", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"skipping the checkpoint of step {newest['step']}: checkpoint {newest['path']}" in result.stdout
    assert "model.safetensors does not match its manifest" in result.stdout
    assert f"resumed from step {previous['step']} ({previous['path']}), next batch {previous['next_batch']}" in (
        result.stdout
    )

    assert_every_batch_once(run_dir)
    assert [c["step"] for c in rows(run_dir, "checkpoints.jsonl")] == list(range(2, STEPS + 1, 2))


def test_losing_the_only_replica_ends_the_run_with_one_line(tmp_path):
    ended = run_and_kill(
        tmp_path / "replica-killed",
        "rollout-0",
        1,
        "services.fleet.max_restarts=0",
        "services.fleet.no_replica_timeout_s=2",
    )
    last = assert_one_line_failure(ended, "rollout replica-0 was killed by SIGKILL")
    assert "no healthy rollout replica" in last
    print(last)


def test_exception_groups_unwrap_to_one_line(tmp_path, capsys):
    """Nested groups (a TaskGroup inside a TaskGroup) end in their root service error's line."""
    from coordinator.failures import report_failure
    from protos.errors import Unavailable

    (tmp_path / "checkpoints.jsonl").write_text('{"step": 2}\n')
    inner = ExceptionGroup("inner", [Unavailable("the learner at 127.0.0.1:1 stopped answering")])
    code = report_failure(ExceptionGroup("unhandled errors in a TaskGroup", [inner]), tmp_path)
    line = capsys.readouterr().err
    assert code == 2
    assert line == (
        f"anvil run: the learner at 127.0.0.1:1 stopped answering; continue it with: anvil run --resume {tmp_path}\n"
    )


def test_a_bug_is_one_line_and_a_traceback_file(tmp_path, capsys):
    from coordinator.failures import ERROR_LOG, report_failure

    try:
        {}["missing"]
    except KeyError as exc:
        code = report_failure(ExceptionGroup("group", [exc]), tmp_path)
    line = capsys.readouterr().err
    assert code == 1
    assert line == f"anvil run: internal error KeyError: 'missing'; the full traceback is in {tmp_path / ERROR_LOG}\n"
    assert "KeyError: 'missing'" in (tmp_path / ERROR_LOG).read_text()
