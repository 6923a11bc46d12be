"""GPU check of the torch learner at a real size: a synthetic 0.5B-parameter model and a 64k-token step.

One command, well under 5 minutes on one GPU, nothing downloaded (the model is built in code with random
weights, Qwen2-0.5B's shape: 24 layers, hidden 896, GQA 14/2 heads, MLP 4864, vocabulary 151,936, tied):

    .venv/bin/python scripts/learner_gpu_check.py                      # CUDA: 0.5B, 65,536 tokens per step
    .venv/bin/python scripts/learner_gpu_check.py --device cpu --model anvil-tiny --tokens 2048 \
        --micro-batch-tokens 512 --steps 1                             # CPU smoke (the test suite runs this)

The step is the RL loop's: one ForwardBackward of a PPO batch of mixed-length sequences (512 to 4096
tokens, summing to --tokens) in token-budget micro-batches (packed, chunked logprobs), then one AdamW
OptimStep, all through the TorchBackend the learner serves (fp32 master weights, bf16 autocast on CUDA).
It runs twice: without and with activation checkpointing. For each it prints the median step time,
tokens/s and the peak memory of the step (CUDA: torch.cuda.max_memory_allocated over the whole step; CPU:
the process's peak resident set), and ends with one JSON line (`RESULT {...}`). It exits 1 if a step's
loss or logprobs are not finite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QWEN2_0_5B_SHAPE = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="synthetic-0.5b", help="synthetic-0.5b, a built-in model or an HF directory")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--tokens", type=int, default=65536, help="tokens per step")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384, help="backend.max_tokens_per_micro_batch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.tokens < 1:
        parser.error("--steps and --tokens must be at least 1")
    return args


def synthetic_model(out_dir: Path) -> Path:
    """Qwen2-0.5B's shape with random weights, saved as a Hugging Face directory (bf16 safetensors)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_0_5B_SHAPE, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


def mixed_lengths(total: int, seed: int = 0) -> list[int]:
    """Sequence lengths from 512 to 4096 (scaled down for small totals) summing to exactly `total`."""
    rng = np.random.default_rng(seed)
    low, high = min(512, max(total // 16, 1)), min(4096, max(total // 4, 2))
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(min(int(rng.integers(low, high + 1)), total - sum(lengths)))
    return lengths


def run_variant(model_dir: Path, args, checkpointing: bool, batch) -> dict:
    from learner.backends.packing import peak_memory_gib
    from learner.backends.torch_backend import TorchBackend
    from learner.config import TorchBackendConfig
    from learner.losses import LOSSES
    from protos.adam import AdamParams

    config = TorchBackendConfig(
        device=args.device, max_tokens_per_micro_batch=args.micro_batch_tokens, activation_checkpointing=checkpointing
    )
    backend = TorchBackend(model_dir, config, seed=0)
    cuda = backend._device.type == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    params = AdamParams(learning_rate=1e-6, grad_clip_norm=1.0)
    durations, peaks, finite = [], [], True
    for _ in range(args.steps + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        synchronize()
        start = time.perf_counter()
        result = backend.forward(batch, LOSSES["ppo"], dict(LOSSES["ppo"].defaults), backward=True)
        stepped = backend.optim_step(params)
        synchronize()
        durations.append(time.perf_counter() - start)
        peaks.append(peak_memory_gib(backend._device))
        finite &= bool(np.isfinite(result.metrics["loss:sum"]) and np.isfinite(stepped["grad_norm:mean"]))
        finite &= all(np.isfinite(values).all() for values in result.logprobs)
    step_s = statistics.median(durations[1:])
    tokens = sum(len(d.model_input) for d in batch.data)
    report = {
        "activation_checkpointing": checkpointing,
        "step_s": step_s,
        "step_samples_s": durations[1:],
        "tokens_per_s": tokens / step_s,
        "peak_memory_gib": max(peaks),
        "micro_batches": int(result.metrics["learner/micro_batches:sum"]),
        "finite": finite,
    }
    del backend
    if cuda:
        torch.cuda.empty_cache()
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: for a CPU smoke run, --device cpu --model anvil-tiny --tokens 2048", file=sys.stderr)
        return 2
    from bench.learner_scaling import rl_batch
    from coordinator.models import resolve_model

    with tempfile.TemporaryDirectory(prefix="anvil-gpu-check-") as scratch:
        started = time.perf_counter()
        if args.model == "synthetic-0.5b":
            model_dir = synthetic_model(Path(scratch) / "synthetic-0.5b")
        else:
            model_dir = resolve_model(args.model)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        lengths = mixed_lengths(args.tokens)
        batch = rl_batch(lengths, vocab)
        print(f"model {args.model} built in {time.perf_counter() - started:.1f} s; "
              f"{len(lengths)} sequences, {sum(lengths)} tokens per step")  # fmt: skip
        variants = [run_variant(model_dir, args, checkpointing, batch) for checkpointing in (False, True)]
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "tokens_per_step": sum(lengths),
        "sequences": len(lengths),
        "max_tokens_per_micro_batch": args.micro_batch_tokens,
        "variants": variants,
    }
    for variant in variants:
        switch = "on " if variant["activation_checkpointing"] else "off"
        print(f"activation checkpointing {switch}: step {variant['step_s']:.3f} s, "
              f"{variant['tokens_per_s']:,.0f} tokens/s, peak memory {variant['peak_memory_gib']:.2f} GiB, "
              f"{variant['micro_batches']} micro-batches")  # fmt: skip
    print("RESULT " + json.dumps(result))
    return 0 if all(variant["finite"] for variant in variants) else 1


if __name__ == "__main__":
    sys.exit(main())
