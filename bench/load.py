"""Load on one gateway: many concurrent SDK sampling clients and a few training sessions at once.

`anvil serve` (a real process: learner, rollout replicas, gateway) is driven by the unmodified `tinker`
SDK from this process: `--samplers` sampling clients (each its own sampling session) each send `--rounds`
samples one after another, all clients at once, while `--trainers` training clients each run
forward_backward + optim_step for as long as the samplers run. Reported: sample latency p50/p99 under that
load against the same request's latency on the idle gateway (the same-run baseline), training steps done,
errors (target 0), and the gateway process's RSS before and after the load (growth = a leak candidate).

    python -m bench.load                 # 200 samplers x 3 rounds, 4 trainers
    python -m bench.load --quick         # 20 samplers x 2 rounds, 2 trainers
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.common import MiB, Ratio, Timing, base_parser, console, run_main, timing_table, write_results

KEY = "tml-load-bench"
PROMPT = [4, 40, 405, 226, 28]


def start_serve(workdir: Path, engine: str, replicas: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`anvil serve` in `workdir` with `extra` `--set` settings; (process, base URL)."""
    settings = ["port=0", f'api_keys=["{KEY}"]', f'state_dir="{workdir / "state"}"',
                f'services.rollout_engine.type="{engine}"', f"services.rollout_replicas={replicas}",
                *extra]  # fmt: skip
    command = [sys.executable, "-m", "coordinator", "serve"] + [a for s in settings for a in ("--set", s)]
    log = workdir / "serve.log"
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=workdir,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        address = next((line.split()[1] for line in log.read_text().splitlines() if line.startswith("LISTENING ")), "")
        if address:
            return process, f"http://{address}"
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"anvil serve did not start:\n{log.read_text()[-3000:]}")


def stop_serve(process: subprocess.Popen) -> None:
    """SIGTERM `anvil serve` (it stops what it started) and wait; SIGKILL if it takes over 2 minutes."""
    process.terminate()
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def main(args) -> None:
    import tinker
    from tinker import types

    samplers, rounds, trainers = (20, 2, 2) if args.quick else (args.samplers, args.rounds, args.trainers)
    with tempfile.TemporaryDirectory(prefix="anvil-bench-load-") as scratch:
        process, base_url = start_serve(Path(scratch), args.engine, args.replicas)
        gateway = psutil.Process(process.pid)
        service = tinker.ServiceClient(base_url=base_url, api_key=KEY)
        try:
            prompt, params = types.ModelInput.from_ints(PROMPT), types.SamplingParams(max_tokens=args.max_tokens)
            idle_client = await service.create_sampling_client_async(base_model="anvil-tiny")
            idle = []
            for _ in range(5 if args.quick else 20):  # the same request on the idle gateway: the baseline
                start = time.perf_counter()
                await idle_client.sample_async(prompt, 1, params)
                idle.append(time.perf_counter() - start)
            clients = await asyncio.gather(
                *(service.create_sampling_client_async(base_model="anvil-tiny") for _ in range(samplers))
            )
            new_trainer = service.create_lora_training_client_async
            training = [await new_trainer(base_model="anvil-tiny", rank=0) for _ in range(trainers)]
            rss_before = gateway.memory_info().rss
            latencies: list[float] = []
            errors: list[str] = []
            steps = [0]
            done = asyncio.Event()

            async def sample_rounds(client) -> None:
                for _ in range(rounds):
                    start = time.perf_counter()
                    try:
                        await client.sample_async(prompt, 1, params)
                        latencies.append(time.perf_counter() - start)
                    except Exception as exc:  # counted, never hidden: the target is none
                        errors.append(f"sample: {type(exc).__name__}: {exc}")

            async def train(client) -> None:
                datum = types.Datum(model_input=types.ModelInput.from_ints(PROMPT[:-1]),
                                    loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * 4})  # fmt: skip
                while not done.is_set():
                    try:
                        await (await client.forward_backward_async([datum], "cross_entropy"))
                        await (await client.optim_step_async(types.AdamParams(learning_rate=1e-4)))
                        steps[0] += 1
                    except Exception as exc:
                        errors.append(f"train: {type(exc).__name__}: {exc}")
                        return

            started = time.perf_counter()
            trainer_tasks = [asyncio.ensure_future(train(client)) for client in training]
            await asyncio.gather(*(sample_rounds(client) for client in clients))
            wall = time.perf_counter() - started
            done.set()
            await asyncio.gather(*trainer_tasks)
            rss_after = gateway.memory_info().rss
        finally:
            await service.close("success")  # else its session heartbeat thread outlives the benchmark
            stop_serve(process)

    loaded = Timing("sample under load (per request)", latencies or [float("nan")])
    baseline = Timing("sample on the idle gateway (per request)", idle)
    console.print(timing_table("load", [baseline, loaded]))
    figures = {
        "samplers": samplers, "rounds": rounds, "trainers": trainers, "requests": samplers * rounds,
        "wall_s": wall, "samples_per_s": len(latencies) / wall if wall else 0.0,
        "sample_p50_s": statistics.median(latencies), "sample_p99_s": percentile(latencies, 0.99),
        "idle_p50_s": statistics.median(idle), "training_steps": steps[0], "errors": len(errors),
        "error_examples": errors[:5], "gateway_rss_before_mib": rss_before / MiB,
        "gateway_rss_after_mib": rss_after / MiB, "gateway_rss_growth_mib": (rss_after - rss_before) / MiB,
    }  # fmt: skip
    for key, value in figures.items():
        console.print(f"{key:>24}: {value:.3f}" if isinstance(value, float) else f"{key:>24}: {value}")
    ratio = Ratio("p50 under load / idle p50", figures["sample_p50_s"] / figures["idle_p50_s"],
                  "latency of one sample with every client at once vs alone (context: 2 shared cores)",
                  higher_is_better=False)  # fmt: skip
    config = {"engine": args.engine, "replicas": args.replicas, "max_tokens": args.max_tokens}
    write_results("load", args.out, config, [baseline, loaded], [ratio], extra={"figures": figures})


def parse_args(argv: list[str] | None = None):
    parser = base_parser("load", __doc__.split("\n\n")[0])
    parser.add_argument("--samplers", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="samples each sampling client sends, one at a time")
    parser.add_argument("--trainers", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--engine", choices=["torch", "vllm"], default="torch")
    parser.add_argument("--replicas", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
