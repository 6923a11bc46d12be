"""Why an `anvil run` ended, in one line: which service failed, what happened, how to continue.

A service that dies mid-run (a learner killed, every rollout replica gone) surfaces in the coordinator as
whatever call happened to be in flight - a gRPC "Socket closed", a fleet timeout - possibly wrapped in
exception groups. Neither says which service to look at, nor that the run can continue from its last
checkpoint. `identify_failure` turns such an error, while the run's services are still at hand, into a
`ServiceFailure` naming the service; `report_failure` prints the one line the CLI ends with (plus the
`anvil run --resume RUN_DIR` command when a checkpoint exists) and picks the exit code: 2 for a failed
service or a refused request, 1 for a bug, whose full traceback goes to the run directory's log.
"""

from __future__ import annotations

import asyncio
import shlex
import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from protos.channels import open_channel
from protos.errors import AnvilError

if TYPE_CHECKING:
    from coordinator.fleet.replica_set import ReplicaSet
    from coordinator.launcher import ServiceHandle
    from coordinator.services import Services

CHECKPOINTS_FILE = "checkpoints.jsonl"
ERROR_LOG = Path("logs") / "coordinator-error.log"
"""Where, under the run directory, the full traceback of an unexpected error is written."""
EXIT_GRACE_S = 2.0
"""A killed service's socket closes a moment before its exit can be reaped: wait this long to see it."""
PROBE_TIMEOUT_S = 2.0


class ServiceFailure(AnvilError):
    """A service the run depends on failed; the message names it and says what happened."""

    def __init__(self, message: str, service: str = "") -> None:
        super().__init__(message)
        self.service = service
        """Which: "learner", "rollout-N", or "rollout" (the fleet as a whole)."""


def root_errors(exc: BaseException) -> list[BaseException]:
    """The leaf errors of (nested) exception groups, in order; a plain error is its own root."""
    if isinstance(exc, BaseExceptionGroup):
        return [root for inner in exc.exceptions for root in root_errors(inner)]
    return [exc]


def is_service_error(exc: BaseException) -> bool:
    """Errors a service or a refused request raises, as opposed to a bug in the coordinator."""
    return isinstance(exc, (AnvilError, grpc.RpcError))


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (gRPC errors: their details), or its type when it has none."""
    text = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def service_label(process_name: str) -> str:
    """The learner is "the learner", rollout-N is "rollout replica-N": the names the fleet's own messages use."""
    if process_name.startswith("rollout-"):
        return f"rollout replica-{process_name.rsplit('-', 1)[1]}"
    return f"the {process_name}"


def how_it_ended(returncode: int) -> str:
    """A Popen return code in words: a negative one is the signal that killed the process."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


async def exited_services(processes: list[ServiceHandle], grace_s: float) -> list[ServiceHandle]:
    """The started services that have exited (learner first), waiting up to `grace_s` for one to show."""
    deadline = asyncio.get_running_loop().time() + grace_s
    while True:
        exited = [p for p in processes if p.poll() is not None]
        if exited or asyncio.get_running_loop().time() >= deadline:
            return sorted(exited, key=lambda p: p.name != "learner")
        await asyncio.sleep(0.1)


async def answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the service at `address` answers a health check (open without a key) in time."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with open_channel(address) as channel:
        try:
            stub = health_pb2_grpc.HealthStub(channel)
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
    return True


async def identify_failure(exc: BaseException, services: Services, rollout: ReplicaSet) -> ServiceFailure | None:
    """The service behind a run's error, while its services are still up; None for a bug (not a service's)."""
    roots = root_errors(exc)
    service_errors = [root for root in roots if is_service_error(root)]
    cause = one_line((service_errors or roots)[0])
    exited = await exited_services(services.processes, EXIT_GRACE_S if service_errors else 0.2)
    if exited:
        first = exited[0]
        ended = "; ".join(f"{service_label(p.name)} {how_it_ended(p.returncode)}" for p in exited)
        return ServiceFailure(f"{ended} ({cause}); its log: {first.log_path}", service=first.name)
    if not service_errors:
        return None
    if not await answers(services.learner_address):
        return ServiceFailure(f"the learner at {services.learner_address} stopped answering ({cause})", "learner")
    if not rollout.health.routable():
        return ServiceFailure(f"no rollout replica serves ({rollout.describe()}): {cause}", service="rollout")
    return None


def resume_hint(run_dir: Path | None) -> str:
    """The command that continues the run, when it has a checkpoint to continue from."""
    if run_dir is None or not (run_dir / CHECKPOINTS_FILE).is_file():
        return ""
    if not (run_dir / CHECKPOINTS_FILE).read_text().strip():
        return ""
    return f"; continue it with: anvil run --resume {shlex.quote(str(run_dir))}"


def report_failure(exc: BaseException, run_dir: Path | None, prog: str = "anvil run") -> int:
    """Print the one line a failed run ends with and return the exit code (2 service, 1 bug)."""
    roots = root_errors(exc)
    known = next((root for root in roots if isinstance(root, ServiceFailure)), None)
    known = known or next((root for root in roots if is_service_error(root)), None)
    if known is not None:
        print(f"{prog}: {one_line(known)}{resume_hint(run_dir)}", file=sys.stderr)
        return 2
    where = write_traceback(exc, run_dir)
    print(
        f"{prog}: internal error {type(roots[0]).__name__}: {one_line(roots[0])}; the full traceback is in "
        f"{where}{resume_hint(run_dir)}",
        file=sys.stderr,
    )
    return 1


def write_traceback(exc: BaseException, run_dir: Path | None) -> str:
    """Write the full traceback where the user can find it: the run directory's log, else stderr."""
    text = "".join(traceback.format_exception(exc))
    if run_dir is not None and run_dir.is_dir():
        path = run_dir / ERROR_LOG
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)
    sys.stderr.write(text)
    return "the output above"
