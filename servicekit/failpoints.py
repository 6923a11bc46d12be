"""Failpoints: named places in Anvil's processes where a fault-injection test kills or freezes the process.

A test cannot time a `kill -9` from outside to land *inside* an optimizer step or halfway through a
weight push; the process itself can. Each place calls `failpoint("learner.optim_step")`; nothing happens
unless `$ANVIL_FAILPOINTS` names it:

    ANVIL_FAILPOINTS="learner.optim_step=kill@3,rollout.push=stop@1"

fires SIGKILL on the third pass through `learner.optim_step` and SIGSTOP on the first `rollout.push`, in
whichever process gets there. Services inherit the variable, so a restarted service would fire again;
with `$ANVIL_FAILPOINTS_ONCE_DIR` set, each failpoint fires once across all processes (the first to
claim `<dir>/<name>` with an exclusive create). Unset - always, outside tests - a failpoint is one dict
lookup.

The places (grep `failpoint(` for the list): `learner.forward_backward` and `learner.optim_step` (after the
computation, before the reply), `learner.checkpoint_write` (files written, not yet renamed into place),
`weights.push_chunk` (the sender, between chunks of a weight push), `rollout.push` (the replica, between
received chunks), `gateway.<kind>` (anvil serve, after a training request ran on the learner and before
its outcome is recorded).
"""

from __future__ import annotations

import functools
import os
import signal
from collections import Counter
from pathlib import Path

ENV = "ANVIL_FAILPOINTS"
ONCE_DIR_ENV = "ANVIL_FAILPOINTS_ONCE_DIR"
ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}

_passes: Counter[str] = Counter()


@functools.cache
def _armed() -> dict[str, tuple[signal.Signals, int]]:
    """name -> (signal, on which pass), from $ANVIL_FAILPOINTS (read once per process)."""
    armed = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV, "").split(","))):
        name, _, spec = item.partition("=")
        action, _, count = spec.partition("@")
        if action not in ACTIONS or not (count or "1").isdigit():
            raise ValueError(f"{ENV}: {item!r} is not <name>=kill|stop[@<pass>]")
        armed[name] = (ACTIONS[action], int(count or 1))
    return armed


def failpoint(name: str) -> None:
    """Kill or stop this process here if `$ANVIL_FAILPOINTS` says so for this pass through `name`."""
    armed = _armed().get(name)
    if armed is None:
        return
    _passes[name] += 1
    if _passes[name] != armed[1]:
        return
    once_dir = os.environ.get(ONCE_DIR_ENV)
    if once_dir:
        try:
            Path(once_dir, name).open("x").close()
        except FileExistsError:  # another process (an earlier life of this service) fired it
            return
    os.kill(os.getpid(), armed[0])
