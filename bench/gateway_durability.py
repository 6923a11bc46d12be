"""What a restartable gateway costs: training steps through `anvil serve` with a durable state after every
optimizer step (`durable_state_every_steps = 1`, the default) against the same steps with none.

Each configuration is a fresh `anvil serve` (torch rollout engine) driven by the unmodified `tinker` SDK:
one training client runs `--steps` steps of forward_backward (`--batch` datums) + optim_step; the first
two are warm-up. The durable state is a background SaveState, so the step waits only for the learner's
in-memory copy of weights and AdamW; the ratio is the median step time with it over without it.

    python -m bench.gateway_durability                    # anvil-tiny, 30 steps
    python -m bench.gateway_durability --model anvil-small
    python -m bench.gateway_durability --quick            # 6 steps
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import Ratio, Timing, base_parser, console, run_main, timing_table, write_results
from bench.load import KEY, start_serve, stop_serve

NEVER = 10**9
"""durable_state_every_steps for the baseline: never within a run."""


async def steps_through_serve(model: str, every: int, steps: int, batch: int) -> list[float]:
    """Seconds per training step (forward_backward + optim_step) through a fresh `anvil serve`."""
    import tinker
    from tinker import types

    with tempfile.TemporaryDirectory(prefix="anvil-bench-durability-") as scratch:
        process, base_url = start_serve(
            Path(scratch), "torch", 1, f'model="{model}"', f"durable_state_every_steps={every}"
        )
        service = tinker.ServiceClient(base_url=base_url, api_key=KEY)
        try:
            training = await service.create_lora_training_client_async(base_model=model, rank=0)
            tokens = list(range(5, 37))
            data = [
                types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                            loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)})
                for _ in range(batch)
            ]  # fmt: skip
            seconds = []
            for _ in range(steps):
                start = time.perf_counter()
                await (await training.forward_backward_async(data, "cross_entropy"))
                await (await training.optim_step_async(types.AdamParams(learning_rate=1e-5)))
                seconds.append(time.perf_counter() - start)
            return seconds[2:]
        finally:
            await service.close("success")  # else its session heartbeat thread outlives the benchmark
            stop_serve(process)


async def main(args) -> None:
    steps = 6 if args.quick else args.steps
    without = Timing("step, no durable states", await steps_through_serve(args.model, NEVER, steps, args.batch))
    durable = Timing("step, durable state every step", await steps_through_serve(args.model, 1, steps, args.batch))
    console.print(timing_table(f"gateway durability ({args.model})", [without, durable]))
    ratio = Ratio(
        "step with durable states / without",
        durable.median / without.median,
        "what restartability costs each training step (a background SaveState after every optim_step)",
        target=1.1,
        higher_is_better=False,
    )
    config = {"model": args.model, "steps": steps, "batch": args.batch}
    write_results("gateway_durability", args.out, config, [without, durable], [ratio])


def parse_args(argv: list[str] | None = None):
    parser = base_parser("gateway_durability", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
