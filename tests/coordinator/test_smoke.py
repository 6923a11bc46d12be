"""The interim main job (`anvil smoke`) passes end to end on real parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_anvil_smoke_passes(tiny_model_dir: Path):
    script = Path(sys.executable).parent / "anvil"
    result = subprocess.run([str(script), "smoke"], capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "smoke passed" in result.stdout
    assert "health SERVING" in result.stdout
    assert "validated" in result.stdout
