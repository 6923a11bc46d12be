"""What a checkpoint costs a training step: SaveState after every step, written synchronously or in the
background (SaveState `background = true`: the state is copied in memory, the files follow while the next
step trains), against the same steps with no checkpoint, interleaved round by round.

A real learner on loopback (the torch backend), driven through `LearnerSession` as `anvil run` drives it;
each round is `--steps` x (ForwardBackward + OptimStep [+ SaveState]) with a fresh checkpoint name per step.
Target: background / none ≤ 1.1 (the save should not stall training); sync / none is the stall removed.

    python -m bench.checkpoint_stall             # anvil-small, 8 x 256 tokens, 4 rounds of 4 steps
    python -m bench.checkpoint_stall --quick     # anvil-tiny
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from bench.common import Ratio, Timing, base_parser, console, run_main, time_interleaved, timing_table, write_results
from bench.learner_overhead import LEARNING_RATE, LOSS, rl_rows
from coordinator.client.learner_api import LearnerSession
from coordinator.models import resolve_model
from learner.config import LearnerConfig
from learner.server import start_learner
from protos.adam import AdamParams
from protos.channels import open_channel

MODES = ("none", "sync", "background")


async def main(args: argparse.Namespace) -> None:
    model = "anvil-tiny" if args.quick else args.model
    steps, rounds = (2, 2) if args.quick else (args.steps, args.rounds)
    with tempfile.TemporaryDirectory(prefix="anvil-bench-ckpt-stall-") as checkpoints:
        config = LearnerConfig(checkpoint_dir=Path(checkpoints), models={model: resolve_model(model)})
        running, _ = await start_learner(config)
        try:
            async with open_channel(running.address) as channel:
                session = await LearnerSession.create(channel, model)
                rows = rl_rows(args.sequences, args.tokens, session.info.vocab_size)
                names = itertools.count()
                answered: dict[str, list[float]] = {mode: [] for mode in MODES[1:]}

                def steps_with(mode: str):
                    async def run() -> None:
                        for _ in range(steps):
                            await session.forward_rows(rows, LOSS, None, backward=True)
                            await session.optim_step(AdamParams(learning_rate=LEARNING_RATE))
                            if mode != "none":
                                start = time.perf_counter()
                                await session.save_state(f"step-{next(names)}", background=mode == "background")
                                answered[mode].append(time.perf_counter() - start)
                        if mode == "background":
                            await session.save_state(f"settle-{next(names)}")  # waits for them: in the timing

                    return run

                cases = [(f"{steps} steps, checkpoint: {mode}", steps_with(mode), 0) for mode in MODES]
                timings = await time_interleaved(cases, rounds)
        finally:
            await running.stop(0)

    by_mode = dict(zip(MODES, timings, strict=True))
    saves = [Timing(f"SaveState answered ({mode})", seconds) for mode, seconds in answered.items()]
    console.print(timing_table("checkpoint stall", [*by_mode.values(), *saves]))
    none = by_mode["none"].median
    ratios = [
        Ratio("background / none (time)", by_mode["background"].median / none,
              "steps with a background SaveState after each (all writes awaited at the end) vs no checkpoint",
              1.1, higher_is_better=False),
        Ratio("sync / none (time)", by_mode["sync"].median / none,
              "steps with a synchronous SaveState after each vs no checkpoint (the stall removed)",
              higher_is_better=False),
        Ratio("background / sync SaveState answer (time)", saves[1].median / saves[0].median,
              "how long the step that saves waits: the in-memory copy vs the whole write",
              higher_is_better=False),
    ]  # fmt: skip
    settings = {"model": model, "steps": steps, "rounds": rounds, "sequences": args.sequences, "tokens": args.tokens}
    notes = ["the writes use the CPU the next steps train on: on a CPU-only machine a background save moves the "
             "stall into the following steps rather than removing it; on a GPU it overlaps GPU compute"]  # fmt: skip
    write_results("checkpoint_stall", args.out, settings, [*by_mode.values(), *saves], ratios, notes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("checkpoint_stall", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-small")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
