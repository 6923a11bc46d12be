"""Lockstep execution: rank 0 broadcasts each command, every rank runs it, rank 0 collects every outcome.

A command is (operation, session key, keyword arguments), pickled over the gloo control group. Each rank
runs `handler(command)` and reports `Outcome(rank, value | error)`; rank 0 raises the first error, keeping
the domain error type (so FailedPrecondition from any rank becomes FAILED_PRECONDITION) and naming the
rank. Collectives inside a command have the compute timeout, so a rank that fails before a collective
makes the others fail after `collective_timeout_s` instead of hanging. An unexpected (non-domain) error
may leave the ranks' states out of step; the commander then refuses further work with UNAVAILABLE and
a message to restart from the last SaveState. Rank 0 serialises commands with a lock because the gRPC
service runs backend calls from several threads.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as dist

from protos.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")
SHUTDOWN = "shutdown"
SHUT_DOWN = "the learner is shutting down"
DOMAIN_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (InvalidArgument, FailedPrecondition, NotFound, Unavailable)
}


@dataclass(frozen=True)
class Command:
    operation: str
    session: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None


def run_command(rank: int, handler: Callable[[Command], Any], command: Command) -> Outcome:
    try:
        return Outcome(rank, value=handler(command))
    except Exception as exc:  # reported to rank 0, which turns it into a status
        log.error("rank %d: %s failed:\n%s", rank, command.operation, traceback.format_exc())
        return Outcome(rank, error_type=type(exc).__name__, error=str(exc) or type(exc).__name__)


def _broadcast(command: Command | None, group) -> Command:
    box = [command]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class Commander:
    """Rank 0's side: `execute` runs a command on every rank and returns rank 0's value."""

    def __init__(self, layout, handler: Callable[[Command], Any]) -> None:
        self.layout = layout
        self.handler = handler
        self._lock = threading.Lock()
        self._broken: str | None = None

    def execute(self, operation: str, session: str = "", **arguments: Any) -> Any:
        with self._lock:
            if self._broken:
                raise Unavailable(self._broken)
            command = _broadcast(Command(operation, session, arguments), self.layout.control_group)
            mine = run_command(0, self.handler, command)
            outcomes: list[Outcome | None] = [None] * self.layout.world_size
            dist.gather_object(mine, outcomes, dst=0, group=self.layout.control_group)
            failed = [o for o in outcomes if o is not None and o.error_type is not None]
            if not failed:
                return mine.value
            first = next((o for o in failed if o.error_type in DOMAIN_ERRORS), None) or _root_cause(failed)
            message = f"{operation} failed on rank {first.rank}: {first.error}"
            if first.error_type in DOMAIN_ERRORS and len(failed) == len(outcomes):
                raise DOMAIN_ERRORS[first.error_type](message)
            self._broken = (
                f"the megatron learner's ranks may be out of step after an error ({message}); restart the "
                "learner and load the last SaveState"
            )
            raise Unavailable(self._broken) if first.error_type in DOMAIN_ERRORS else RuntimeError(message)

    def shutdown(self) -> None:
        """Release the other ranks (the control group still works after a failed compute collective)."""
        with self._lock:
            if self._broken == SHUT_DOWN:
                return
            self._broken = SHUT_DOWN
            try:
                _broadcast(Command(SHUTDOWN, "", {}), self.layout.control_group)
            except RuntimeError as exc:  # a rank already gone: nothing left to release
                log.warning("could not tell every rank to shut down: %s", exc)


def _root_cause(failed: list[Outcome]) -> Outcome:
    """Prefer a rank's own error over the timeouts it caused on the others."""

    def is_timeout(outcome: Outcome) -> bool:
        return any(word in (outcome.error or "").lower() for word in ("timeout", "timed out"))

    return next((o for o in failed if not is_timeout(o)), failed[0])


def worker_loop(layout, handler: Callable[[Command], Any]) -> None:
    """Ranks > 0: run every command rank 0 broadcasts until it says shut down (or the group dies)."""
    while True:
        command = _broadcast(None, layout.control_group)
        if command.operation == SHUTDOWN:
            return
        outcome = run_command(layout.rank, handler, command)
        dist.gather_object(
            Outcome(outcome.rank, None, outcome.error_type, outcome.error), None, dst=0, group=layout.control_group
        )


def agree(layout, check: Callable[[], T]) -> T:
    """Run `check` on every rank inside a command; if it fails anywhere, raise the same error everywhere.

    Use before a collective that some rank might not reach (e.g. a checkpoint one rank cannot read)."""
    try:
        result, problem = check(), None
    except Exception as exc:
        result, problem = None, (type(exc).__name__, f"rank {layout.rank}: {exc}")
    problems: list = [None] * layout.world_size
    dist.all_gather_object(problems, problem, group=layout.control_group)
    found = next((p for p in problems if p is not None), None)
    if found is not None:
        raise DOMAIN_ERRORS.get(found[0], RuntimeError)(found[1])
    return result
