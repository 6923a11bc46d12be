"""Checkpoint writes that go on after SaveState answered (`background = true`), one registry per session.

The backend copies its state in memory first (`state_snapshot`), so training continues at once and the
files hold exactly the state at the save. A LoadState of a checkpoint still being written waits for it; a
write that fails is not lost: it is logged, and the session's next SaveState fails with its error (the
caller learns that the checkpoint it was told about never became complete; a resume skips it anyway,
since an incomplete checkpoint does not verify).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protos.errors import AnvilError, FailedPrecondition

log = logging.getLogger(__name__)


class BackgroundWrites:
    def __init__(self) -> None:
        self._pending: dict[Path, asyncio.Task] = {}
        self._failure: AnvilError | None = None

    def start(self, target: Path, write: Callable[[], Any]) -> None:
        """Run `write` (blocking: it goes to a worker thread) for checkpoint `target`."""
        task = asyncio.get_running_loop().create_task(asyncio.to_thread(write))
        self._pending[target] = task
        task.add_done_callback(lambda done: self._finished(target, done))

    def _finished(self, target: Path, task: asyncio.Task) -> None:
        if self._pending.get(target) is task:
            del self._pending[target]
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        log.error("background write of checkpoint %s failed: %s", target, error)
        message = f"the background write of checkpoint {target.name!r} failed: {error}"
        self._failure = type(error)(message) if isinstance(error, AnvilError) else FailedPrecondition(message)

    async def settle(self, target: Path | None = None) -> None:
        """Wait for the write of `target` (every pending write when None)."""
        if target is None:
            tasks = list(self._pending.values())
        else:
            tasks = [self._pending[target]] if target in self._pending else []
        await asyncio.gather(*tasks, return_exceptions=True)

    def raise_failure(self) -> None:
        """Raise (once) the error of a background write that failed since the last call."""
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure
