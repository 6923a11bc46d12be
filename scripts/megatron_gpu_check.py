"""GPU check of the Megatron learner backend: logprob parity with the PyTorch backend, and step time.

One command, a few minutes on one GPU (anvil-small is built in code, nothing is downloaded):

    .venv/bin/python scripts/megatron_gpu_check.py                     # CUDA, bf16, TP=1
    .venv/bin/python scripts/megatron_gpu_check.py --tp 2              # 2 ranks, started as `anvil run` starts them
    .venv/bin/python scripts/megatron_gpu_check.py --device cpu --dtype float32 --model anvil-tiny  # CPU smoke

With tp * pp > 1 and no torchrun environment, the script relaunches itself as that many ranks through
the launcher `anvil run` starts a Megatron learner with (learner.backends.megatron.torchrun).

It runs the same random batch through (a) the Megatron backend at the requested device/dtype,
(b) the PyTorch backend on the same device (bf16 autocast on CUDA), and (c) the PyTorch backend in
float32 on the CPU as ground truth. It prints the logprob differences (Megatron vs PyTorch at the same
precision, and each vs the fp32 ground truth), then times fwd+bwd+AdamW steps of both backends
(median after one warm-up), and ends with one JSON line. It exits 1 when the Megatron backend's error
against the fp32 ground truth exceeds twice the PyTorch backend's own (plus 2e-3), i.e. when Megatron is
clearly less accurate than the reference at the same precision.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="anvil-small", help="built-in model name or HF directory")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend (after one warm-up)")
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=0,
        help="backend.max_tokens_per_micro_batch (0: the default); below batch*seq the step runs M micro-batches "
        "(1F1B through the stages with --pp > 1)",
    )  # fmt: skip
    return parser.parse_args(argv)


def make_batch(vocab: int, batch: int, seq: int):
    from learner.batch import batch_from_arrow
    from protos.arrow_schemas import encode_batch, make_batch

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(batch):
        tokens = rng.integers(0, vocab, size=seq + 1)
        rows.append({"model_input": tokens[:-1], "target_tokens": tokens[1:], "weights": np.ones(seq, np.float32)})
    return batch_from_arrow(encode_batch(make_batch(rows)), vocab_size=vocab)


def timed_steps(backend, batch, loss, steps: int, synchronize) -> list[float]:
    """Seconds per fwd+bwd+AdamW step, the warm-up step left out."""
    from protos.adam import AdamParams

    params = AdamParams(learning_rate=1e-5, grad_clip_norm=1.0)
    durations = []
    for _ in range(steps + 1):
        synchronize()
        start = time.perf_counter()
        backend.forward(batch, loss, {}, backward=True)
        backend.optim_step(params)
        synchronize()
        durations.append(time.perf_counter() - start)
    return durations[1:]


def differences(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, float]:
    diff = np.abs(np.concatenate(a) - np.concatenate(b))
    return {"max": float(diff.max()), "mean": float(diff.mean())}


def relaunch_as_ranks(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Start tp * pp ranks of this script through the learner's torchrun launcher, unless already a rank."""
    ranks = args.tp * args.pp
    if ranks == 1 or "RANK" in os.environ:
        return None
    from learner.backends.megatron.torchrun import main as launch

    return launch(["--nproc", str(ranks), "--script", str(Path(__file__).resolve()), *argv])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    relaunched = relaunch_as_ranks(args, argv)
    if relaunched is not None:
        return relaunched
    try:
        import megatron.core
    except ImportError:
        print("megatron-core is not installed: pip install -e '.[megatron]' (or '.[gpu]')", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu --dtype float32 for a CPU smoke run", file=sys.stderr)
        return 2
    from coordinator.models import resolve_model
    from learner.backends.megatron import parallel
    from learner.backends.megatron.backend import EngineHost, MegatronBackend, set_commander
    from learner.backends.megatron.lockstep import Commander, worker_loop
    from learner.backends.packing import plan_micro_batches
    from learner.backends.torch_backend import TorchBackend
    from learner.config import MegatronBackendConfig, TorchBackendConfig
    from learner.losses import LOSSES

    budget = {"max_tokens_per_micro_batch": args.micro_batch_tokens} if args.micro_batch_tokens else {}
    config = MegatronBackendConfig(tp=args.tp, pp=args.pp, device=args.device, dtype=args.dtype, **budget)
    layout = parallel.initialize(config)
    host = EngineHost(config, layout)
    if layout.rank != 0:
        worker_loop(layout, host)
        parallel.shutdown()
        return 0
    commander = Commander(layout, host)
    set_commander(commander)
    try:
        model_dir = resolve_model(args.model)
        device = str(layout.device)
        synchronize = torch.cuda.synchronize if layout.device.type == "cuda" else (lambda: None)
        megatron = MegatronBackend(model_dir, config, seed=0)
        batch = make_batch(megatron.description.vocab_size, args.batch, args.seq)
        loss = LOSSES["cross_entropy"]
        same_precision = TorchBackend(model_dir, TorchBackendConfig(device=device), seed=0)
        ground_truth = TorchBackend(model_dir, TorchBackendConfig(device="cpu"), seed=0)
        lp_megatron = megatron.forward(batch, loss, {}, backward=False).logprobs
        lp_torch = same_precision.forward(batch, loss, {}, backward=False).logprobs
        lp_truth = ground_truth.forward(batch, loss, {}, backward=False).logprobs
        del ground_truth
        result = {
            "model": args.model,
            "device": torch.cuda.get_device_name() if layout.device.type == "cuda" else "cpu",
            "dtype": config.dtype,
            "tp": layout.tp,
            "pp": layout.pp,
            "tokens_per_step": args.batch * args.seq,
            "micro_batches": len(plan_micro_batches([args.seq] * args.batch, config.max_tokens_per_micro_batch)),
            "megatron_vs_torch": differences(lp_megatron, lp_torch),
            "megatron_vs_fp32": differences(lp_megatron, lp_truth),
            "torch_vs_fp32": differences(lp_torch, lp_truth),
        }
        print(f"logprob |diff| megatron vs torch ({config.dtype}): {result['megatron_vs_torch']}")
        print(f"logprob |diff| megatron vs fp32 ground truth:   {result['megatron_vs_fp32']}")
        print(f"logprob |diff| torch vs fp32 ground truth:      {result['torch_vs_fp32']}")
        result["megatron_step_samples_s"] = timed_steps(megatron, batch, loss, args.steps, synchronize)
        result["torch_step_samples_s"] = timed_steps(same_precision, batch, loss, args.steps, synchronize)
        result["megatron_step_s"] = statistics.median(result["megatron_step_samples_s"])
        result["torch_step_s"] = statistics.median(result["torch_step_samples_s"])
        print(f"step time (fwd+bwd+AdamW, median of {args.steps}): megatron {result['megatron_step_s']:.4f} s, "
              f"torch {result['torch_step_s']:.4f} s")  # fmt: skip
        allowed = 2 * result["torch_vs_fp32"]["mean"] + 2e-3
        result["passed"] = result["megatron_vs_fp32"]["mean"] <= allowed
        verdict = "PASS" if result["passed"] else "FAIL"
        print(f"{verdict}: megatron mean error {result['megatron_vs_fp32']['mean']:.2e} vs allowed {allowed:.2e}")
        print("RESULT " + json.dumps(result))
        return 0 if result["passed"] else 1
    finally:
        commander.shutdown()
        set_commander(None)
        parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
