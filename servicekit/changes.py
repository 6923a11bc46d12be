"""Changes: wake every waiter when shared state changed; cancellation-safe, no lock.

`asyncio.Condition` needs its lock to wait, and a waiter cancelled while it re-acquires that lock can
hang for good on Python 3.11 (seen: the samplers of an ending run, cancelled while they waited for a
healthy replica, never finished, and the run never exited). State shared between coroutines needs no
lock between awaits anyway; what a waiter needs is to be woken. So each generation of changes is an
`asyncio.Event`: `notify` sets the current one and starts the next; a waiter waits on the one current
when it looked at the state, so a change between its look and its wait is never missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Changes:
    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake everyone waiting now; later waiters wait for the next change."""
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float | None = None) -> bool:
        """Until the next change (True) or `timeout` seconds (False)."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_until(self, ready: Callable[[], bool], timeout: float) -> bool:
        """Until `ready()` holds (True) or `timeout` seconds passed (False); re-checked at every change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not ready():
            remaining = deadline - loop.time()
            if remaining <= 0 or not await self.wait(remaining):
                return ready()
        return True
