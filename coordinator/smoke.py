"""`anvil smoke`: the pieces end to end on real parts, until the RL loop is the main job.

It resolves the model (building `anvil-tiny` in code on first use), starts a real learner gRPC server
on loopback with an API key, and fine-tunes the model over the wire - Arrow batches in, ForwardBackward
(cross_entropy on the answer tokens), OptimStep - on a handful of arithmetic prompts in the built-in chat
format. It then exports the weights with SaveWeights, loads them with transformers, and answers the
prompts greedily. It fails (exit 1) unless the loss falls by at least half.
"""

from __future__ import annotations

import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

PROMPTS = [(a, b) for a, b in [(12, 7), (3, 5), (20, 22), (8, 9), (31, 4), (6, 6), (15, 27), (40, 2)]]


def chat_example(tokenizer: Any, a: int, b: int) -> tuple[list[int], list[int]]:
    """(prompt tokens, answer tokens) in the built-in chat format; the answer ends with <|end|>."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"What is {a}+{b}?"}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(f"{a + b}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids, answer_ids


def supervised_rows(tokenizer: Any) -> list[dict]:
    rows = []
    for a, b in PROMPTS:
        prompt_ids, answer_ids = chat_example(tokenizer, a, b)
        sequence = prompt_ids + answer_ids
        rows.append(
            {
                "model_input": sequence[:-1],
                "target_tokens": sequence[1:],
                "weights": [0.0] * (len(prompt_ids) - 1) + [1.0] * len(answer_ids),
            }
        )
    return rows


async def run_smoke(model: str = "anvil-tiny", steps: int = 80, learning_rate: float = 3e-3) -> int:
    from transformers import AutoTokenizer

    from coordinator.models import resolve_model
    from learner.config import LearnerConfig
    from learner.server import start_learner
    from protos.anvil.v1 import common_pb2, learner_pb2, learner_pb2_grpc
    from protos.arrow_schemas import encode_batch, make_batch
    from protos.channels import open_channel
    from protos.rpc import ServerConfig

    console = Console()
    started = time.perf_counter()
    model_dir = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = supervised_rows(tokenizer)
    answer_tokens = sum(sum(row["weights"]) for row in rows)
    batch = common_pb2.DataBatch(arrow_ipc_stream=encode_batch(make_batch(rows)))
    console.print(f"model [bold]{model}[/] at {model_dir}")

    api_key = secrets.token_hex(8)
    with tempfile.TemporaryDirectory() as checkpoints:
        config = LearnerConfig(
            server=ServerConfig(api_key=api_key), checkpoint_dir=Path(checkpoints), models={model: model_dir}
        )
        running, _ = await start_learner(config)
        try:
            async with open_channel(running.address, api_key=api_key) as channel:
                stub = learner_pb2_grpc.LearnerServiceStub(channel)
                session = await stub.CreateSession(learner_pb2.CreateSessionRequest(base_model=model, seed=0))
                console.print(
                    f"learner on {running.address}: session {session.session_id}, "
                    f"{session.info.num_parameters / 1e6:.2f} M parameters, full-parameter AdamW"
                )
                table = Table(title=f"supervised fine-tuning over gRPC ({len(rows)} prompts)")
                for column in ("step", "loss / answer token", "grad norm"):
                    table.add_column(column, justify="right")
                losses = []
                seq_id = 0
                for step in range(1, steps + 1):
                    seq_id += 1
                    reply = await stub.ForwardBackward(
                        learner_pb2.ForwardBackwardRequest(
                            session_id=session.session_id, seq_id=seq_id, batch=batch, loss_fn="cross_entropy"
                        )
                    )
                    seq_id += 1
                    stepped = await stub.OptimStep(
                        learner_pb2.OptimStepRequest(
                            session_id=session.session_id,
                            seq_id=seq_id,
                            adam_params=common_pb2.AdamParams(learning_rate=learning_rate),
                        )
                    )
                    losses.append(reply.metrics["loss:sum"] / answer_tokens)
                    if step == 1 or step % 5 == 0:
                        table.add_row(str(step), f"{losses[-1]:.3f}", f"{stepped.metrics['grad_norm:mean']:.3f}")
                console.print(table)
                seq_id += 1
                saved = await stub.SaveWeights(
                    learner_pb2.SaveWeightsRequest(session_id=session.session_id, seq_id=seq_id, name="smoke")
                )
            answers = _answer_with_transformers(Path(saved.path), tokenizer)
        finally:
            await running.stop()

    correct = sum(answer == str(a + b) for (a, b), answer in zip(PROMPTS, answers, strict=True))
    console.print(
        "answers from the saved weights (transformers, greedy): "
        + ", ".join(f"{a}+{b}={answer}" for (a, b), answer in zip(PROMPTS, answers, strict=True))
    )
    elapsed = time.perf_counter() - started
    console.print(
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f} per answer token; {correct}/{len(PROMPTS)} answers right; "
        f"{elapsed:.1f} s"
    )
    if not losses[-1] < 0.5 * losses[0]:
        console.print("[bold red]smoke failed: the loss did not fall by half[/]")
        return 1
    console.print("[bold green]smoke passed[/]")
    return 0


def _answer_with_transformers(weights_dir: Path, tokenizer: Any) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32).eval()
    answers = []
    for a, b in PROMPTS:
        prompt_ids, _ = chat_example(tokenizer, a, b)
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                max_new_tokens=6,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        answers.append(tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True).strip())
    return answers
