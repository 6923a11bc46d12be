"""`anvil smoke`: one pass through every piece the foundation provides, on real parts.

Until the RL loop lands this is the README's main job: it builds (or finds) the model, renders a prompt
in the built-in chat format, samples a completion with transformers while recording per-token logprobs,
ships prompt+completion as an Arrow trajectory batch through encode -> decode -> validate, and probes
a real gRPC server on loopback (health over an authenticated channel). Any failure exits non-zero.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.table import Table


async def run_smoke(model: str = "anvil-tiny", max_new_tokens: int = 8) -> int:
    console = Console()
    table = Table(title=f"anvil smoke ({model})")
    table.add_column("step")
    table.add_column("result")
    table.add_column("seconds", justify="right")

    def record(step: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        value, summary = fn()
        table.add_row(step, summary, f"{time.perf_counter() - start:.2f}")
        return value

    from coordinator.models import resolve_model

    model_dir = record("resolve model", lambda: (lambda d: (d, str(d)))(resolve_model(model)))
    hf_model, tokenizer = record("load with transformers", lambda: _load(model_dir))
    prompt_ids = record("render chat prompt", lambda: _render_prompt(tokenizer))
    completion_ids, logprobs = record(
        "sample greedily", lambda: _sample(hf_model, tokenizer, prompt_ids, max_new_tokens)
    )
    record("Arrow batch round trip", lambda: _batch_round_trip(prompt_ids, completion_ids, logprobs, tokenizer))
    await _probe_server(table)
    console.print(table)
    console.print("[bold green]smoke passed[/]")
    return 0


def _load(model_dir: Any) -> tuple[tuple[Any, Any], str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    num_params = sum(p.numel() for p in hf_model.parameters())
    return (hf_model, tokenizer), f"{num_params / 1e6:.2f} M parameters, vocab {hf_model.config.vocab_size}"


def _render_prompt(tokenizer: Any) -> tuple[list[int], str]:
    messages = [{"role": "user", "content": "What is 12+7?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer(ids, add_special_tokens=False)["input_ids"]
    return prompt_ids, f"{len(prompt_ids)} tokens: {tokenizer.convert_ids_to_tokens(prompt_ids)}"


def _sample(hf_model: Any, tokenizer: Any, prompt_ids: list[int], max_new_tokens: int) -> Any:
    import torch

    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tokenizer.pad_token_id,
        )
    completion = out.sequences[0, len(prompt_ids) :].tolist()
    logprobs = [
        torch.log_softmax(score[0].float(), dim=-1)[token].item()
        for score, token in zip(out.scores, completion, strict=False)
    ]
    text = tokenizer.decode(completion)
    return (completion, logprobs), f"{len(completion)} tokens {text!r} (untrained weights)"


def _batch_round_trip(prompt_ids: list[int], completion_ids: list[int], logprobs: list[float], tokenizer: Any):
    from protos.arrow_schemas import decode_batch, encode_batch, make_batch, validate_batch

    sequence = prompt_ids + completion_ids
    n_prompt = len(prompt_ids)
    row = {
        "model_input": sequence[:-1],
        "target_tokens": sequence[1:],
        "weights": [0.0] * (n_prompt - 1) + [1.0] * len(completion_ids),
        "logprobs": [0.0] * (n_prompt - 1) + logprobs,
        "advantages": [0.0] * (n_prompt - 1) + [1.0] * len(completion_ids),
        "sampler_version": 0,
        "group_id": 0,
        "reward": 0.0,
    }
    payload = encode_batch(make_batch([row]))
    table = validate_batch(decode_batch(payload), vocab_size=len(tokenizer))
    assert table["target_tokens"].to_pylist()[0] == sequence[1:], "batch round trip changed the targets"
    return table, f"{len(payload)} bytes of Arrow IPC, {table.num_columns} columns, validated"


async def _probe_server(table: Table) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from protos.rpc import ServerConfig, open_channel, start_server

    start = time.perf_counter()
    api_key = secrets.token_hex(8)
    running = await start_server(ServerConfig(api_key=api_key), services=[])
    try:
        async with open_channel(running.address, api_key=api_key) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"health check answered {status}")
    finally:
        await running.stop()
    table.add_row(
        "gRPC server on loopback", f"{running.address}: health {status}", f"{time.perf_counter() - start:.2f}"
    )
