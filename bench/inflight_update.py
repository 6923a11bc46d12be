"""In-flight weight updates vs drain: the longest request stall during an update, and rollout tokens/s with an
update every N ms vs without updates, both modes measured in the same run (issue 17, item 1).

Each mode gets its own real rollout server (anvil-tiny, in this process, gRPC on loopback). Stall: while a
long generation (LONG tokens) runs, an update is committed and short probe Samples are sent at the same
moment; the stall is the slowest probe's latency (drain makes new requests wait for the long generation).
Throughput: `samplers` concurrent Sample loops for `seconds`, without updates, then with a full update
pushed every `every_ms`; the ratio is with / without (target >= 0.9).

    python -m bench.inflight_update [--engine torch|vllm] [--out bench/results/inflight_update.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
from pathlib import Path

import torch

from coordinator.models import resolve_model
from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.weights_codec import push_weight_update
from rollout.config import RolloutConfig
from rollout.server import start_rollout

PROMPT = [4, 295, 289, 226, 22, 23, 16, 28]
LONG = 400


def perturbed(model: torch.nn.Module, seed: int) -> list:
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return tensors_as_bytes(changed.named_parameters())


def sample_request(max_tokens: int, n: int, seed: int) -> rollout_pb2.SampleRequest:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True)
    return rollout_pb2.SampleRequest(prompt_tokens=PROMPT, num_samples=n, sampling_params=params)


async def stall(stub, channel, weights: list, version: int) -> dict[str, float]:
    """Commit during a long generation, with probes sent at the same time; latencies in seconds."""
    long_run = asyncio.ensure_future(stub.Sample(sample_request(LONG, 2, 1)))
    await asyncio.sleep(0.3)
    start = time.perf_counter()
    probes = [asyncio.ensure_future(stub.Sample(sample_request(4, 1, i))) for i in range(4)]
    await push_weight_update(channel, version, weights)
    commit_s = time.perf_counter() - start
    latencies = []
    for probe in probes:
        await probe
        latencies.append(time.perf_counter() - start)
    await long_run
    return {"commit_s": commit_s, "max_probe_latency_s": max(latencies), "long_done_s": time.perf_counter() - start}


async def throughput(stub, channel, seconds: float, samplers: int, update, every_ms: float | None) -> dict:
    tokens = 0
    updates = 0
    deadline = time.perf_counter() + seconds

    async def loop(index: int) -> None:
        nonlocal tokens
        seed = index * 1000
        while time.perf_counter() < deadline:
            seed += 1
            reply = await stub.Sample(sample_request(64, 4, seed))
            tokens += sum(len(s.tokens) for s in reply.sequences)

    async def updater() -> None:
        nonlocal updates
        while time.perf_counter() < deadline:
            await asyncio.sleep(every_ms / 1000)
            await update()
            updates += 1

    start = time.perf_counter()
    tasks = [loop(i) for i in range(samplers)] + ([updater()] if every_ms else [])
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": tokens / elapsed, "updates": updates, "seconds": elapsed}


async def run_mode(engine: str, swap: str, model_dir: Path, args) -> dict:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sets = [perturbed(base, seed) for seed in range(3)]
    config = RolloutConfig.model_validate({"model": model_dir, "engine": {"type": engine, "swap": swap}})
    running, servicer = await start_rollout(config)
    version = 0
    try:
        async with open_channel(running.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)

            async def update() -> None:
                nonlocal version
                version += 1
                await push_weight_update(channel, version, sets[version % len(sets)])

            await update()  # the base weights of anvil-tiny decode slowly here (see the docs); start off them
            await stub.Sample(sample_request(8, 1, 0))  # warm up
            version += 1
            stalls = await stall(stub, channel, sets[version % len(sets)], version)
            quiet = await throughput(stub, channel, args.seconds, args.samplers, update, None)
            busy = await throughput(stub, channel, args.seconds, args.samplers, update, args.every_ms)
    finally:
        await running.stop(0)
        await servicer.engine.close()
    return {
        "stall": stalls,
        "no_updates": quiet,
        "with_updates": busy,
        "tokens_per_s_ratio": busy["tokens_per_s"] / quiet["tokens_per_s"],
    }


async def main(args) -> dict:
    model_dir = resolve_model("anvil-tiny")
    results = {mode: await run_mode(args.engine, mode, model_dir, args) for mode in ("inflight", "drain")}
    inflight, drain = results["inflight"]["stall"], results["drain"]["stall"]
    summary = {
        "engine": args.engine,
        "long_tokens": LONG,
        "every_ms": args.every_ms,
        "samplers": args.samplers,
        "seconds": args.seconds,
        "modes": results,
        "longest_stall_s": {"inflight": inflight["max_probe_latency_s"], "drain": drain["max_probe_latency_s"]},
        "stall_ratio_inflight_over_drain": inflight["max_probe_latency_s"] / drain["max_probe_latency_s"],
        "commit_s": {"inflight": inflight["commit_s"], "drain": drain["commit_s"]},
        "tokens_per_s_ratio_with_updates": {m: r["tokens_per_s_ratio"] for m, r in results.items()},
        "target_tokens_per_s_ratio": 0.9,
    }
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="torch", choices=["torch", "vllm"])
    parser.add_argument("--every-ms", type=float, default=1000.0)
    parser.add_argument("--samplers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=None)
    arguments = parser.parse_args()
    summary = asyncio.run(main(arguments))
    text = json.dumps(summary, indent=2)
    print(text)
    if arguments.out:
        arguments.out.write_text(text + "\n")
