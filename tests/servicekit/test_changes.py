"""Changes wakes every waiter, times out cleanly, and waiters cancelled all at once finish at once."""

from __future__ import annotations

import asyncio

from servicekit.changes import Changes


async def test_notify_wakes_every_waiter_and_wait_until_times_out():
    changes, state = Changes(), {"ready": False}
    waiters = [asyncio.create_task(changes.wait_until(lambda: state["ready"], timeout=5)) for _ in range(3)]
    await asyncio.sleep(0.01)
    changes.notify()  # a change that does not make them ready: they wait on
    await asyncio.sleep(0.01)
    assert not any(w.done() for w in waiters)
    state["ready"] = True
    changes.notify()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert await changes.wait_until(lambda: False, timeout=0.05) is False
    assert await changes.wait(timeout=0.01) is False


async def test_waiters_cancelled_together_all_finish():
    changes = Changes()
    waiters = [asyncio.create_task(changes.wait_until(lambda: False, timeout=60)) for _ in range(20)]
    await asyncio.sleep(0.01)
    for waiter in waiters:
        waiter.cancel()
    changes.notify()  # a change racing the cancellations must not leave anyone behind
    done, pending = await asyncio.wait(waiters, timeout=2)
    assert not pending and all(w.cancelled() for w in done)
