"""ForwardBackward + OptimStep through the learner's gRPC service vs calling its backend in process.

Both paths drive the same backend object of a real learner serving `anvil-small` on loopback, with the
same RL batch (importance_sampling: tokens, sampler logprobs, advantages). Through the service a step
is what a client pays: build and encode the Arrow batch, ForwardBackward (request parsing, sequencing,
ingestion and validation, the backend in a worker thread, outputs encoded and decoded), then OptimStep.
In process it is `backend.forward(batch, ...)` + `backend.optim_step(...)` on an already decoded batch.
The two are interleaved step by step, so drift in the machine's load hits both alike. Target: the
service costs ≤ 10 % over the in-process call.

    python -m bench.learner_overhead           # anvil-small, 8 sequences x 256 tokens
    python -m bench.learner_overhead --quick   # anvil-tiny, 4 x 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Ratio, Timing, base_parser, console, run_main, timing_table, write_results
from coordinator.models import resolve_model
from learner.batch import batch_from_arrow
from learner.config import LearnerConfig
from learner.losses import resolve_loss
from learner.server import start_learner
from protos.adam import AdamParams
from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
from protos.arrow_schemas import decode_outputs, encode_batch, make_batch
from protos.channels import open_channel

LOSS = "importance_sampling"
LEARNING_RATE = 1e-5


def rl_rows(sequences: int, tokens: int, vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(sequences):
        ids = rng.integers(0, vocab, tokens + 1, dtype=np.int32)
        rows.append(
            {
                "model_input": ids[:-1],
                "target_tokens": ids[1:],
                "logprobs": -rng.random(tokens, dtype=np.float32) * 5,
                "advantages": np.full(tokens, rng.standard_normal(), dtype=np.float32),
            }
        )
    return rows


async def main(args: argparse.Namespace) -> None:
    model = "anvil-tiny" if args.quick else args.model
    sequences, tokens = (4, 64) if args.quick else (args.sequences, args.tokens)
    repeats = args.repeats or (2 if args.quick else 6)
    model_dir = resolve_model(model)
    with tempfile.TemporaryDirectory(prefix="anvil-bench-learner-") as checkpoints:
        config = LearnerConfig(checkpoint_dir=Path(checkpoints), models={model: model_dir})
        running, servicer = await start_learner(config)
        try:
            async with open_channel(running.address) as channel:
                stub = learner_pb2_grpc.LearnerServiceStub(channel)
                created = await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=model, seed=0))
                session_id, vocab = created.session_id, created.info.vocab_size
                backend = servicer.sessions.get(session_id).backend
                rows = rl_rows(sequences, tokens, vocab)
                seq_ids = iter(range(1, 1_000_000))

                async def through_service() -> None:
                    batch = {"arrow_ipc_stream": encode_batch(make_batch(rows))}  # as LearnerSession builds it
                    reply = await stub.ForwardBackward(
                        learner_pb2.ForwardBackwardRequest(
                            session_id=session_id, seq_id=next(seq_ids), batch=batch, loss_fn=LOSS
                        )
                    )
                    decode_outputs(reply.outputs.arrow_ipc_stream)
                    await stub.OptimStep(
                        learner_pb2.OptimStepRequest(
                            session_id=session_id,
                            seq_id=next(seq_ids),
                            adam_params=common_pb2.AdamParams(learning_rate=LEARNING_RATE),
                        )
                    )

                decoded = batch_from_arrow(encode_batch(make_batch(rows)), vocab)
                loss, loss_config = resolve_loss(LOSS, decoded.input_names, {}, decoded.multi_target)

                def in_process() -> None:
                    backend.forward(decoded, loss, loss_config, True)
                    backend.optim_step(AdamParams(learning_rate=LEARNING_RATE))

                service_s, direct_s = [], []
                await through_service()  # warm-up both paths
                await asyncio.to_thread(in_process)
                for _ in range(repeats):
                    start = time.perf_counter()
                    await through_service()
                    service_s.append(time.perf_counter() - start)
                    start = time.perf_counter()
                    await asyncio.to_thread(in_process)  # a worker thread, as the service runs it
                    direct_s.append(time.perf_counter() - start)
        finally:
            await running.stop(0)

    service = Timing("gRPC service: ForwardBackward + OptimStep", service_s)
    direct = Timing("baseline: backend.forward + optim_step in process", direct_s)
    console.print(timing_table("learner overhead", [direct, service]))
    ratios = [
        Ratio(
            "service / in-process (time)",
            service.median / direct.median,
            "a training step through gRPC (client encode included) vs the backend called directly",
            1.10,
            higher_is_better=False,
        )
    ]
    config = {"model": model, "sequences": sequences, "tokens": tokens, "loss": LOSS, "repeats": repeats}
    write_results("learner_overhead", args.out, config, [direct, service], ratios)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser("learner_overhead", __doc__.split("\n\n")[0])
    parser.add_argument("--model", default="anvil-small")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--repeats", type=int, default=0, help="interleaved steps per path (0: 6, or 2 with --quick)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_main(main, parse_args())
