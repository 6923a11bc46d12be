"""examples/tinker_rl_loop.py, written only against the tinker SDK, raises reward through the gateway."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.coordinator.gateway.conftest import TINKER_KEY

pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "tinker_rl_loop.py"


def test_the_sdk_only_rl_loop_raises_reward(stack):
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "30"],
        env={**os.environ, "TINKER_BASE_URL": stack.base_url, "TINKER_API_KEY": TINKER_KEY, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert summary["last_reward"] > summary["first_reward"] + 0.2, completed.stdout
