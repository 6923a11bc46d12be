"""The token boundary of an engine that decodes in worker threads: where an in-flight weight swap fits.

A decoding step (one forward pass, and the read of the weight version that labels the token it yields)
runs inside `step()`; a swap runs inside `swapping()`. A waiting swap is served before the next step
starts, so a swap waits for at most the step in progress, never for the whole generation, and a decode
loop that re-enters `step()` at once cannot starve it (a plain lock gives no such order).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator


class TokenBoundary:
    """Steps (worker threads) or one swap (the event loop); a waiting swap goes before the next step."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._stepping = 0
        self._swapping = False
        self._swaps_waiting = 0

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One decoding step; blocks (in its worker thread) while a swap is waiting or running."""
        with self._condition:
            self._condition.wait_for(lambda: not self._swapping and self._swaps_waiting == 0)
            self._stepping += 1
        try:
            yield
        finally:
            with self._condition:
                self._stepping -= 1
                self._condition.notify_all()

    def _enter_swap(self) -> None:
        with self._condition:
            self._swaps_waiting += 1
            try:
                self._condition.wait_for(lambda: self._stepping == 0 and not self._swapping)
            finally:
                self._swaps_waiting -= 1
            self._swapping = True

    def _exit_swap(self) -> None:
        with self._condition:
            self._swapping = False
            self._condition.notify_all()

    @contextlib.asynccontextmanager
    async def swapping(self) -> AsyncIterator[None]:
        """Hold the boundary: no step runs inside. Waiting happens in a thread, off the event loop; a
        cancelled wait still enters and leaves, so the boundary is never left held."""
        entering = asyncio.ensure_future(asyncio.to_thread(self._enter_swap))
        try:
            await asyncio.shield(entering)
        except asyncio.CancelledError:
            await entering
            self._exit_swap()
            raise
        try:
            yield
        finally:
            self._exit_swap()
