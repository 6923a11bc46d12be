"""The torch learner at real shapes: packing vs padding, memory vs the micro-batch budget, and the main
job's learner step, each against a baseline measured in the same run.

- packed vs padded: a mixed-length RL batch (lengths spread 16..2048) through forward+backward, the
  backend (packed token-budget micro-batches, chunked logprobs) vs the padded path it replaced (one
  right-padded batch through the model, a full log-softmax per row). Tokens/s of real tokens; target
  ≥ 1.5x.
- memory: the peak resident set of a fresh process running one forward+backward of a batch at the
  budget, and of a batch 4x the budget (separate processes, since the peak only grows); target
  4x / 1x ≤ 1.2.
- the main job's step: 16 x 32 datums of copy_digit's shape (a 16-token prompt, one completion token,
  ppo), forward+backward+optim_step, new path vs the padded one (interleaved).

    python -m bench.learner_scaling           # anvil-tiny, 16 sequences of 16..2048 tokens
    python -m bench.learner_scaling --quick   # fewer, shorter sequences
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Ratio, Timing, base_parser, console, run_main, timing_table, write_results
from coordinator.models import resolve_model
from learner.backends.packing import peak_rss_gib
from learner.backends.torch_backend import TorchBackend
from learner.batch import Datum, TrainingBatch
from learner.config import TorchBackendConfig
from learner.losses import LOSSES, loss_inputs_T
from protos.adam import AdamParams

MODEL = "anvil-tiny"
LOSS = LOSSES["ppo"]


def rl_batch(lengths: list[int], vocab: int, seed: int = 0) -> TrainingBatch:
    rng = np.random.default_rng(seed)
    data = [
        Datum(
            model_input=rng.integers(5, vocab, n).astype(np.int64),
            target_tokens=rng.integers(5, vocab, n).astype(np.int64),
            loss_inputs={
                "logprobs": -rng.random(n, dtype=np.float32) * 5,
                "advantages": np.full(n, rng.standard_normal(), dtype=np.float32),
            },
        )
        for n in lengths
    ]
    return TrainingBatch(data, frozenset({"logprobs", "advantages"}))


def padded_forward_backward(backend: TorchBackend, batch: TrainingBatch) -> None:
    """The path the backend had before packing: one right-padded batch, a full log-softmax per row."""
    lengths = [len(d.model_input) for d in batch.data]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, datum in enumerate(batch.data):
        ids[row, : lengths[row]] = torch.from_numpy(datum.model_input)
        mask[row, : lengths[row]] = 1
    logits = backend.model(input_ids=ids, attention_mask=mask).logits
    per_datum = []
    for row, datum in enumerate(batch.data):
        logprobs = torch.log_softmax(logits[row, : lengths[row]].float(), dim=-1)
        per_datum.append(logprobs.gather(1, torch.from_numpy(datum.target_tokens).view(-1, 1)).reshape(-1))
    loss, _ = LOSS.fn(torch.cat(per_datum), loss_inputs_T(batch.data, batch.input_names), dict(LOSS.defaults))
    loss.backward()


def packed_forward_backward(backend: TorchBackend, batch: TrainingBatch) -> None:
    backend.forward(batch, LOSS, dict(LOSS.defaults), backward=True)


def interleaved(backend: TorchBackend, batch: TrainingBatch, repeats: int, step: bool) -> tuple[list, list]:
    """Seconds per call of the padded and the packed path, alternating (load drift hits both)."""
    padded, packed = [], []
    for path in (padded_forward_backward, packed_forward_backward):
        path(backend, batch)  # warm-up
    for _ in range(repeats):
        for path, into in ((padded_forward_backward, padded), (packed_forward_backward, packed)):
            start = time.perf_counter()
            path(backend, batch)
            if step:
                backend.optim_step(AdamParams(learning_rate=1e-6))
            else:
                backend.model.zero_grad(set_to_none=True)
            into.append(time.perf_counter() - start)
    return padded, packed


def step_memory_gib(tokens: int, budget: int) -> tuple[float, float]:
    """A fresh process: one forward+backward of `tokens` tokens (in 256-token sequences) at `budget`;
    its peak resident set, and how much of it came after the model was loaded (GiB)."""
    probe = f"memory_probe({tokens}, {budget})"
    code = f"import json; from bench.learner_scaling import memory_probe; print(json.dumps({probe}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    peak, loaded = json.loads(out.strip().splitlines()[-1])
    return peak, peak - loaded


def memory_probe(tokens: int, budget: int) -> tuple[float, float]:
    """(peak RSS, RSS once the model is loaded), GiB, of this process running one forward+backward."""
    backend = TorchBackend(resolve_model(MODEL), TorchBackendConfig(device="cpu", max_tokens_per_micro_batch=budget), 0)
    batch = rl_batch([256] * (tokens // 256), backend.description.vocab_size)
    loaded = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    packed_forward_backward(backend, batch)
    return peak_rss_gib(), loaded


async def main(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    count, longest = (6, 256) if args.quick else (16, 2048)
    lengths = sorted(rng.integers(16, longest + 1, count).tolist(), key=lambda _: rng.random())
    lengths[0] = longest  # the batch always holds one sequence of the longest length
    repeats = args.repeats or (1 if args.quick else 3)
    backend = TorchBackend(resolve_model(MODEL), TorchBackendConfig(device="cpu"), seed=0)
    vocab = backend.description.vocab_size
    mixed = rl_batch(lengths, vocab)
    padded_s, packed_s = interleaved(backend, mixed, repeats, step=False)
    tokens = sum(lengths)
    padded = Timing(f"baseline: padded forward+backward, {count} seqs 16..{longest}", padded_s, num_bytes=0)
    packed = Timing(f"packed micro-batches forward+backward, {tokens} tokens", packed_s)

    main_job = rl_batch([16] * 512, vocab, seed=1)  # copy_digit: 16 x 32 samples, prompt + 1 token
    step_before_s, step_after_s = interleaved(backend, main_job, repeats * 3, step=True)
    step_before = Timing("baseline: main job learner step, padded (before)", step_before_s)
    step_after = Timing("main job learner step, packed (after)", step_after_s)

    budget = 1024 if args.quick else 4096
    (peak_1x, grown_1x), (peak_4x, grown_4x) = step_memory_gib(budget, budget), step_memory_gib(4 * budget, budget)
    console.print(timing_table("learner scaling", [padded, packed, step_before, step_after]))
    console.print(
        f"peak RSS: {peak_1x:.3f} GiB at 1x the budget ({budget} tokens), {peak_4x:.3f} GiB at 4x; "
        f"of which after loading the model: {grown_1x:.3f} GiB and {grown_4x:.3f} GiB"
    )
    ratios = [
        Ratio("packed / padded (tokens/s)", padded.median / packed.median,
              "real tokens per second through forward+backward, mixed lengths", 1.5),
        Ratio("peak RSS 4x budget / 1x budget", peak_4x / peak_1x,
              "a request 4x the micro-batch budget vs one at the budget", 1.2, higher_is_better=False),
        Ratio("peak RSS growth 4x / 1x", grown_4x / max(grown_1x, 1e-9),
              "context: the same, counting only what the step added after the model was loaded", None,
              higher_is_better=False),
        Ratio("main job step after / before (time)", step_after.median / step_before.median,
              "the learner's forward+backward+optim_step on the main job's batch", None, higher_is_better=False),
    ]  # fmt: skip
    for ratio in ratios:
        console.print(f"{ratio.name}: {ratio.value:.3f} (target {ratio.target}, met {ratio.met})")
    config = {"model": MODEL, "lengths": lengths, "budget_tokens": budget, "repeats": repeats, "loss": LOSS.name}
    extra = {"peak_rss_gib": {"1x": peak_1x, "4x": peak_4x}, "rss_growth_gib": {"1x": grown_1x, "4x": grown_4x}}
    write_results("learner_scaling", args.out, {**config, **extra}, [padded, packed, step_before, step_after], ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("learner_scaling", __doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=0, help="interleaved repeats per path (0: 3, or 1 with --quick)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
