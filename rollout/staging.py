"""Staging directories: where a rollout writes weights for an engine that reloads from disk (vLLM).

They live under the engine's `staging_dir` (tmpfs by default, so they hold RAM), named
`anvil-staging-<pid>-<random>`. A replica removes its own when it is done with them, but one killed
with kill -9 cannot; so every rollout engine that starts removes the staging directories whose process
is gone. (A reused pid keeps its leftover until a later start finds that process gone too.)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "anvil-staging-"
logger = logging.getLogger(__name__)


def new_staging_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_orphans(root: Path) -> list[Path]:
    """Remove the staging directories under `root` whose rollout process no longer runs; return them."""
    removed = []
    for entry in root.glob(f"{PREFIX}*"):
        pid = entry.name[len(PREFIX) :].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    if removed:
        logger.info("removed %d staging directories of rollout processes that are gone", len(removed))
    return removed
