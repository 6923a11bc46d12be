"""scripts/megatron_gpu_check.py stays runnable: a CPU smoke run here, the real bf16 run on a GPU."""

from __future__ import annotations

import pytest

from tests.learner.megatron.needs import require_megatron
from tests.learner.script_check import run_check as run_script_check

require_megatron()


def run_check(*arguments: str) -> dict:
    return run_script_check("megatron_gpu_check.py", *arguments)


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
