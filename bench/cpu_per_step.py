"""Where an `anvil run`'s CPU goes: core-seconds per training step of every process the run starts.

Starts `anvil run CONFIG` (with any `--set` overrides), waits until step `--from`, reads the CPU time
(user + system, /proc via psutil) of the run and of every process under it, waits until step `--to`,
reads them again, and prints each process's core-seconds per step next to the wall seconds per step,
then stops the run. On a machine with few cores this shows which process the step is waiting on and
which one burns CPU without doing work (it found vLLM's worker spinning between steps: docs/rl-loop.md).

    python -m bench.cpu_per_step configs/copy_digit.toml
    python -m bench.cpu_per_step configs/copy_digit.toml --set loop.max_off_policy_steps=0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import REPO_ROOT


def last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    return max((json.loads(line).get("step", 0) for line in lines if line.strip()), default=0)


def cpu_seconds(root: psutil.Process) -> dict[int, tuple[str, float]]:
    """pid -> (command, user + system CPU seconds) for the run and everything under it."""
    out = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            out[process.pid] = (" ".join(process.cmdline()[:4])[-60:], times.user + times.system)
        except psutil.Error:
            continue
    return out


def wait_for_step(metrics: Path, step: int, run: subprocess.Popen) -> None:
    while last_step(metrics) < step:
        if run.poll() is not None:
            raise RuntimeError(f"the run ended (rc {run.returncode}) before step {step}")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_per_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="TOML run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run override (repeatable)")
    parser.add_argument("--from", dest="first", type=int, default=20, help="first step of the window")
    parser.add_argument("--to", dest="last", type=int, default=70, help="last step of the window")
    args = parser.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="anvil-cpu-per-step-")) / "run"
    overrides = [f"loop.steps={args.last + 5}", "loop.checkpoint_every=100000", *args.set]
    command = [sys.executable, "-m", "coordinator", "run", args.config, "--run-dir", str(run_dir)]
    command += [part for override in overrides for part in ("--set", override)]
    log = (run_dir.parent / "run.log").open("w")
    run = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        root = psutil.Process(run.pid)
        wait_for_step(run_dir / "metrics.jsonl", args.first, run)
        before, started, first = cpu_seconds(root), time.monotonic(), last_step(run_dir / "metrics.jsonl")
        wait_for_step(run_dir / "metrics.jsonl", args.last, run)
        after, ended, last = cpu_seconds(root), time.monotonic(), last_step(run_dir / "metrics.jsonl")
    finally:
        run.terminate()
        run.wait()
    steps = last - first
    print(f"{steps} steps, {(ended - started) / steps:.3f} s/step wall, {psutil.cpu_count()} cores")
    total = 0.0
    for pid, (name, seconds) in after.items():
        if pid in before:
            per_step = (seconds - before[pid][1]) / steps
            total += per_step
            print(f"{per_step:7.3f} core-s/step  {pid:>7}  {name}")
    print(f"{total:7.3f} core-s/step in all, of {psutil.cpu_count() * (ended - started) / steps:.3f} available")
    return 0


if __name__ == "__main__":
    sys.exit(main())
