"""Megatron's 1F1B pipeline on these cores: does PP divide time as well as memory?

One batch (16 sequences x 128 tokens of anvil-tiny, fp32, CPU, one thread per rank) through the
Megatron learner's fwd+bwd+AdamW step, each layout a fresh `scripts/megatron_gpu_check.py` run (its
ranks started by the learner's torchrun launcher):

- baseline: PP=2 with the whole request as one micro-batch (M=1): the stages compute in turn.
- PP=2 with M=8 micro-batches through megatron-core's 1F1B schedule: the stages overlap.
- context: PP=1 (one rank, one core) with the same 8 micro-batches.

With two stages on two cores the ideal 1F1B step is (M + 1) / (2M) of the M=1 step (0.56 for M=8),
before the cost of smaller matmuls and the extra sends.

    python -m bench.megatron_pipeline
    python -m bench.megatron_pipeline --quick    # fewer steps
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.common import REPO_ROOT, Ratio, Timing, base_parser, console, run_main, timing_table, write_results

BATCH, SEQ = 16, 128
M = 8


def run_layout(pp: int, micro_batch_tokens: int, steps: int) -> dict:
    command = [
        sys.executable, "scripts/megatron_gpu_check.py", "--device", "cpu", "--dtype", "float32",
        "--model", "anvil-tiny", "--batch", str(BATCH), "--seq", str(SEQ), "--steps", str(steps),
        "--pp", str(pp), "--micro-batch-tokens", str(micro_batch_tokens),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"pp={pp} run failed (rc {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


async def main(args: argparse.Namespace) -> None:
    steps = 3 if args.quick else 8
    tokens = BATCH * SEQ
    whole = run_layout(2, tokens, steps)
    pieces = run_layout(2, tokens // M, steps)
    one_stage = run_layout(1, tokens // M, steps)
    assert (whole["micro_batches"], pieces["micro_batches"], one_stage["micro_batches"]) == (1, M, M)
    timings = [
        Timing(f"baseline: PP=2, M=1 ({tokens} tokens)", whole["megatron_step_samples_s"]),
        Timing(f"PP=2, M={M}, 1F1B", pieces["megatron_step_samples_s"]),
        Timing(f"context: PP=1 (one rank), M={M}", one_stage["megatron_step_samples_s"]),
    ]
    console.print(timing_table("megatron pipeline: fwd+bwd+AdamW step", timings))
    ratios = [
        Ratio(f"PP=2 M={M} / M=1 (time)", timings[1].median / timings[0].median,
              f"the same step with the stages overlapping; ideal (M+1)/(2M) = {(M + 1) / (2 * M):.2f}", None,
              higher_is_better=False),
        Ratio(f"PP=2 / PP=1 at M={M} (time)", timings[1].median / timings[2].median,
              "two stages on two cores vs all layers on one", None, higher_is_better=False),
    ]  # fmt: skip
    config = {"model": "anvil-tiny", "batch": BATCH, "seq": SEQ, "micro_batches": M, "steps": steps}
    write_results("megatron_pipeline", args.out, config, timings, ratios)


if __name__ == "__main__":
    run_main(main, base_parser("megatron_pipeline", __doc__.split("\n\n")[0]).parse_args())
