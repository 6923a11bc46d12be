"""Staging directories of rollout processes that are gone are removed; live processes' are kept."""

from __future__ import annotations

import os
import subprocess
import sys

from rollout.staging import PREFIX, new_staging_dir, remove_orphans


def test_only_the_staging_of_processes_that_are_gone_is_removed(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f"{PREFIX}{dead_pid}-abc"
        live = tmp_path / f"{PREFIX}{sleeper.pid}-def"
        other = tmp_path / "anvil-weights-unrelated"
        for directory in (dead, live, other):
            directory.mkdir()
            (directory / "model.safetensors").write_bytes(b"x")
        own = new_staging_dir(tmp_path)
        assert own.name.startswith(f"{PREFIX}{os.getpid()}-")
        assert remove_orphans(tmp_path) == [dead]
        assert not dead.exists() and live.exists() and other.exists() and own.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert remove_orphans(tmp_path) == [live]
