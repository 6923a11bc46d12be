"""Start learner and rollout services as separate processes on loopback, and stop them cleanly.

Each service is `python -m learner|rollout` with `--set` overrides, bound to port 0; its output goes to
<run_dir>/logs/<name>.log, where the launcher waits for the `LISTENING host:port` line. Children get
SIGTERM if the coordinator dies (Linux PR_SET_PDEATHSIG, which the child sets on itself at start when
$ANVIL_PARENT_PID is set: see servicekit.process.die_with_parent), so even a killed coordinator leaves no
service behind; a normal stop sends SIGTERM and waits for a graceful exit. Each service leads its own
process group, and whatever it leaves there (a killed vLLM replica's engine processes) is killed after
it exits; a service whose start is abandoned (timeout, cancellation) is stopped the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protos.errors import Unavailable
from servicekit.process import PARENT_PID_ENV


def toml_value(value: object) -> str:
    """A Python scalar as a TOML literal for `--set key=value`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


class ServiceHandle(Protocol):
    """What a run holds for each service it started, wherever it runs (ServiceProcess here, RayService on
    a Ray node): its address, a pid, whether it exited, and how to stop it."""

    name: str
    address: str
    log_path: Path

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def stop(self, timeout_s: float = 60.0) -> int | None: ...

    def kill_group(self) -> None: ...


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen
    address: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def poll(self) -> int | None:
        """Its exit code, or None while it runs (the interface every service handle has: see
        coordinator/cluster/ray_services.py for one on another machine)."""
        return self.process.poll()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.kill_group()
        return self.process.returncode

    def kill_group(self) -> None:
        """Kill what the service left in its process group (a vLLM replica's engine-core and worker
        processes outlive a kill -9 of the replica itself). The service leads its own group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)


async def start_service(
    name: str,
    module: str,
    overrides: list[str],
    log_dir: Path,
    env: dict[str, str],
    timeout_s: float,
    arguments: tuple[str, ...] = (),
    listens: bool = True,
) -> ServiceProcess:
    """Run `python -m module [arguments] --set ...` and wait until it reports the address it listens on
    (`listens=False`: a process that serves nothing itself, e.g. a Megatron rank other than 0)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    command = [sys.executable, "-m", module, *arguments, "--set", "server.port=0"]
    for override in overrides:
        command += ["--set", override]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            # No preexec_fn: forking a process with running gRPC threads through Python's fork path
            # (needed for preexec_fn) occasionally aborted the child; the child sets PDEATHSIG itself.
            # Its own process group (setsid, done without preexec_fn), so all it started can be killed.
            start_new_session=True,
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())},
        )
    starting = ServiceProcess(name, process, "", log_path)
    if not listens:
        return starting
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in log_path.read_text(errors="replace").splitlines():
                if line.startswith("LISTENING "):
                    return ServiceProcess(name, process, line.split()[1], log_path)
            if process.poll() is not None:
                raise Unavailable(f"{name} exited with code {process.returncode} before listening; see {log_path}")
            await asyncio.sleep(0.1)
        raise Unavailable(f"{name} did not listen within {timeout_s:g}s; see {log_path}")
    except BaseException:  # timed out, failed, or the caller gave up (cancelled): nothing may be left behind
        starting.stop(timeout_s=10)
        raise
