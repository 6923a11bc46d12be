"""The interim main job (`anvil smoke`) trains over a real learner on loopback and passes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_anvil_smoke_trains_and_passes(tiny_model_dir: Path):
    script = Path(sys.executable).parent / "anvil"
    result = subprocess.run([str(script), "smoke"], capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke passed" in result.stdout
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+) per answer token", result.stdout).groups())
    assert last < 0.5 * first
