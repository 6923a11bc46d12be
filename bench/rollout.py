"""Sampling throughput: Sample through the rollout service vs the engine called directly, and vLLM vs the
PyTorch reference engine.

For each engine one instance is built in this process; rounds of concurrent requests (P prompts, n
samples each, a fixed number of new tokens, EOS ignored so every round makes the same number of tokens)
go alternately straight to `engine.sample` and through a real RolloutService on loopback serving that
same engine (request validation, the serving gate, protobuf both ways). Tokens/s is generated tokens
over the round's wall time. Targets: the service costs ≤ 10 % of the direct tokens/s; vLLM / torch is
reported (no target: it says which engine to run on this machine).

    python -m bench.rollout            # anvil-small, vLLM and torch engines
    python -m bench.rollout --quick    # anvil-tiny, torch engine, a few tokens
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import time

from bench.common import Ratio, Timing, base_parser, console, run_main, timing_table, write_results
from coordinator.models import resolve_model
from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.rpc import ServerConfig, ServiceSpec, start_server
from rollout.config import TorchEngineConfig, VllmEngineConfig
from rollout.engines import build_engine
from rollout.engines.base import PromptScoring, SamplingSpec
from rollout.server import SERVICE_NAME
from rollout.service import RolloutServicer
from rollout.weights import WeightUpdater, checkpoint_shapes


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    return [[(7 * p + 3 * i + 11) % vocab for i in range(length)] for p in range(count)]


async def bench_engine(name: str, args: argparse.Namespace, model_path, repeats: int) -> tuple[Timing, Timing]:
    config = VllmEngineConfig() if name == "vllm" else TorchEngineConfig(device="cpu")
    engine = await build_engine(config, model_path)
    servicer = RolloutServicer(engine, WeightUpdater(engine, checkpoint_shapes(model_path)), "bench")
    running = await start_server(
        ServerConfig(), [ServiceSpec(rollout_pb2_grpc.add_RolloutServiceServicer_to_server, servicer, SERVICE_NAME)]
    )
    batch = prompts(args.prompts, args.prompt_tokens, engine.description.vocab_size)
    round_tokens = args.prompts * args.samples * args.max_tokens
    try:
        async with open_channel(running.address) as channel:
            stub = rollout_pb2_grpc.RolloutServiceStub(channel)

            async def direct(seed: int) -> None:
                async def one(index: int, prompt: list[int]) -> int:
                    spec = SamplingSpec(args.max_tokens, 1.0, 1.0, -1, seed * 1000 + index, (), (), True)
                    result = await engine.sample(prompt, args.samples, spec, PromptScoring())
                    return sum(len(s.tokens) for s in result.sequences)

                made = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
                assert sum(made) == round_tokens

            async def service(seed: int) -> None:
                async def one(index: int, prompt: list[int]) -> int:
                    params = common_pb2.SamplingParams(
                        max_tokens=args.max_tokens, temperature=1.0, seed=seed * 1000 + index, ignore_eos=True
                    )
                    request = rollout_pb2.SampleRequest(
                        prompt_tokens=prompt, num_samples=args.samples, sampling_params=params
                    )
                    reply = await stub.Sample(request)
                    return sum(len(s.tokens) for s in reply.sequences)

                made = await asyncio.gather(*(one(i, p) for i, p in enumerate(batch)))
                assert sum(made) == round_tokens

            await direct(0)  # warm-up (first requests compile / allocate)
            await service(0)
            direct_s, service_s = [], []
            for round_index in range(1, repeats + 1):
                for path, samples in ((direct, direct_s), (service, service_s)):
                    start = time.perf_counter()
                    await path(round_index)
                    samples.append(time.perf_counter() - start)
    finally:
        await running.stop(0)
        await engine.close()
    direct_timing = Timing(f"{name}: engine.sample directly", direct_s, extra={"tokens_per_round": round_tokens})
    service_timing = Timing(f"{name}: Sample through the service", service_s, extra={"tokens_per_round": round_tokens})
    for timing in (direct_timing, service_timing):
        timing.extra["tokens_per_s"] = round_tokens / timing.median
    return direct_timing, service_timing


async def main(args: argparse.Namespace) -> None:
    if args.quick:
        args.model, args.prompts, args.samples, args.max_tokens = "anvil-tiny", 2, 2, 8
    engines = args.engines or (["torch"] if args.quick else ["vllm", "torch"])
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        engines.remove("vllm")
        console.print("[yellow]vllm is not installed: the vLLM engine is left out[/]")
    repeats = args.repeats or (2 if args.quick else 4)
    model_path = resolve_model(args.model)
    timings: list[Timing] = []
    ratios: list[Ratio] = []
    direct_rate: dict[str, float] = {}
    for name in engines:
        direct, service = await bench_engine(name, args, model_path, repeats)
        gc.collect()  # finalize the closed engine now: vLLM's finalizer fails at interpreter exit
        timings += [direct, service]
        direct_rate[name] = direct.extra["tokens_per_s"]
        ratios.append(
            Ratio(
                f"{name}: service / direct (tokens/s)",
                service.extra["tokens_per_s"] / direct.extra["tokens_per_s"],
                "Sample through gRPC vs engine.sample in process (1.0 = no overhead)",
                0.90,
            )
        )
    if {"vllm", "torch"} <= set(direct_rate):
        ratios.append(
            Ratio(
                "vllm / torch (tokens/s)", direct_rate["vllm"] / direct_rate["torch"], "engine vs engine, direct calls"
            )
        )
    console.print(timing_table("rollout (median round time)", timings))
    for timing in timings:
        console.print(f"  {timing.name}: {timing.extra['tokens_per_s']:.0f} tokens/s")
    config = {
        "model": args.model,
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "repeats": repeats,
        "engines": engines,
    }
    write_results("rollout", args.out, config, timings, ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("rollout", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-small")
    parser.add_argument("--prompts", type=int, default=8, help="concurrent Sample requests per round")
    parser.add_argument("--samples", type=int, default=4, help="samples per prompt (n)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32, help="new tokens per sample (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per path (0: 4, or 2 with --quick)")
    parser.add_argument("--engines", nargs="*", choices=["vllm", "torch"])
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
