"""Run a device-check script (scripts/*_gpu_check.py) the way a person does and return its RESULT line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def run_check(script: str, *arguments: str) -> dict:
    """`python scripts/<script> ARGS` from the repository root with one OpenMP thread per process; the
    JSON after `RESULT ` (the script must exit 0)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), *arguments],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
