"""scripts/megatron_gpu_check.py stays runnable: a CPU smoke run here, the real bf16 run on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.learner.megatron.needs import require_megatron

require_megatron()
REPO_ROOT = Path(__file__).resolve().parents[3]
SCRIPT = REPO_ROOT / "scripts" / "megatron_gpu_check.py"


def run_check(*arguments: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *arguments], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_cpu_smoke_run_reports_float32_parity():
    result = run_check("--device", "cpu", "--dtype", "float32", "--model", "anvil-tiny", "--batch", "2",
                       "--seq", "32", "--steps", "1")  # fmt: skip
    assert result["passed"] and result["tp"] == 1 and result["dtype"] == "float32"
    assert result["megatron_vs_torch"]["max"] < 1e-5  # same fp32 maths, only reduction order differs
    assert result["megatron_step_s"] > 0 and result["torch_step_s"] > 0


@pytest.mark.gpu
def test_bf16_run_on_cuda_matches_the_torch_backend():
    result = run_check()  # anvil-small, bf16, TP=1
    assert result["passed"], result


def test_tp2_check_starts_its_ranks_through_the_learners_launcher():
    """`--tp 2` with no torchrun around it: the script relaunches itself as 2 ranks, as `anvil run` starts them."""
    result = run_check("--device", "cpu", "--dtype", "float32", "--model", "anvil-tiny", "--batch", "2",
                       "--seq", "32", "--steps", "1", "--tp", "2")  # fmt: skip
    assert result["passed"] and result["tp"] == 2
    assert result["megatron_vs_torch"]["max"] < 1e-5
