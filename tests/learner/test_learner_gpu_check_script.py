"""scripts/learner_gpu_check.py stays runnable: a CPU smoke run here, the 0.5B / 64k-token run on a GPU."""

from __future__ import annotations

import pytest

from tests.learner.script_check import run_check as run_script_check


def run_check(*arguments: str) -> dict:
    return run_script_check("learner_gpu_check.py", *arguments)


def test_cpu_smoke_run_reports_both_variants():
    result = run_check("--device", "cpu", "--model", "anvil-tiny", "--tokens", "2048", "--micro-batch-tokens", "512",
                       "--steps", "1")  # fmt: skip
    assert result["tokens_per_step"] == 2048 and result["device"] == "cpu"
    assert [v["activation_checkpointing"] for v in result["variants"]] == [False, True]
    for variant in result["variants"]:
        assert variant["finite"] and variant["micro_batches"] >= 4  # 2048 tokens at a 512-token budget
        assert variant["tokens_per_s"] > 0 and variant["peak_memory_gib"] > 0


@pytest.mark.gpu
def test_half_billion_parameters_at_64k_tokens_on_cuda():
    result = run_check()  # synthetic 0.5B, 65,536 tokens, 16,384-token micro-batches
    assert result["tokens_per_step"] == 65536
    checkpointed = result["variants"][1]
    assert all(v["finite"] for v in result["variants"])
    assert checkpointed["peak_memory_gib"] < result["variants"][0]["peak_memory_gib"], result
