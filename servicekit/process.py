"""Services never outlive the process that launched them (Linux PR_SET_PDEATHSIG, set by the child)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "ANVIL_PARENT_PID"
"""Set by coordinator.launcher for the services it starts: they must not outlive that process."""


def die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when the launching process dies (PR_SET_PDEATHSIG), if one is
    named in $ANVIL_PARENT_PID; exit at once if it already died before we got here.

    A launched service leads its own process group. Until it installs its graceful SIGTERM handling
    (protos.rpc.serve_until_signal), a SIGTERM kills the whole group: a service stopped while still
    starting (a vLLM replica whose engine processes are being spawned) leaves nothing behind."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    if os.getpgid(0) == os.getpid():
        signal.signal(signal.SIGTERM, _kill_own_group)
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != int(parent):
        os.kill(os.getpid(), signal.SIGTERM)


def _kill_own_group(signum: int, frame: object) -> None:
    os.killpg(os.getpid(), signal.SIGKILL)
