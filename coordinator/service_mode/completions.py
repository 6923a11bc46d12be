"""Completions for a deployment (`/inference/v1/completions`, `/v1/completions`), as the Fireworks SDK
reads them: token-id prompts, `raw_output.completion_token_ids`, per-token `logprob` and
`sampling_logprob` (the sampler's logprob of the token it drew, which is what the learner's forward
reproduces at temperature 1), `finish_reason` stop|length, and SSE streaming that ends with `[DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from coordinator.service_mode.deployments import DeploymentRuntime
from protos.anvil.v1 import common_pb2, rollout_pb2
from protos.errors import InvalidArgument

_FINISH = {common_pb2.STOP_REASON_STOP: "stop", common_pb2.STOP_REASON_LENGTH: "length"}


def _prompt_ids(runtime: DeploymentRuntime, prompt: Any) -> list[int]:
    if isinstance(prompt, str):
        return list(runtime.tokenizer.encode(prompt, add_special_tokens=False))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return list(prompt)
    raise InvalidArgument("prompt must be a non-empty list of token ids or a string")


async def complete(runtime: DeploymentRuntime, body: dict[str, Any]) -> dict[str, Any]:
    """One completions response (all `n` choices) from a replica of the deployment."""
    prompt = _prompt_ids(runtime, body.get("prompt"))
    n = int(body.get("n") or 1)
    top_k = int(body.get("top_k") or 0)
    stop = body.get("stop")
    params = common_pb2.SamplingParams(
        max_tokens=int(body.get("max_tokens") or 16),
        temperature=float(body.get("temperature", 1.0)),
        top_p=float(body.get("top_p") or 1.0),
        top_k=top_k if top_k > 0 else -1,
    )
    if body.get("seed") is not None:
        params.seed = int(body["seed"])
    if isinstance(stop, str):
        params.stop_strings.append(stop)
    elif isinstance(stop, list):
        params.stop_strings.extend(s for s in stop if isinstance(s, str))
    echo = bool(body.get("echo"))
    request = rollout_pb2.SampleRequest(
        prompt_tokens=prompt, num_samples=n, sampling_params=params, include_prompt_logprobs=echo
    )
    # Routed by the deployment's ReplicaSet: least in flight, failed over if a replica dies mid-request.
    reply = await runtime.replicas.call(lambda stub, timeout: stub.Sample(request, timeout=timeout))
    choices = []
    decode = runtime.tokenizer.decode
    for index, sequence in enumerate(reply.sequences):
        tokens, logprobs = list(sequence.tokens), [float(x) for x in sequence.logprobs]
        if echo:  # the prompt too; its first token has no logprob
            tokens, logprobs = prompt + tokens, [0.0, *[float(x) for x in reply.prompt_logprobs], *logprobs]
        content = [
            {"token": decode([t]), "token_id": t, "logprob": lp, "sampling_logprob": lp, "bytes": []}
            for t, lp in zip(tokens, logprobs, strict=True)
        ]
        text = decode(list(sequence.tokens))
        choices.append(
            {
                "index": index,
                "text": text,
                "logprobs": {"content": content} if body.get("logprobs") else None,
                "finish_reason": _FINISH.get(sequence.stop_reason, "length"),
                "raw_output": {"prompt_token_ids": prompt, "completion_token_ids": tokens, "completion": text},
            }
        )
    completion_tokens = sum(len(s.tokens) for s in reply.sequences)
    return {
        "id": f"cmpl-{uuid.uuid4().hex[:16]}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "choices": choices,
        "usage": {
            "prompt_tokens": len(prompt),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt) + completion_tokens,
        },
        "anvil_weight_version": reply.weight_version,
    }


async def sse_events(result: dict[str, Any]) -> AsyncIterator[bytes]:
    """The response as one SSE event per choice, then usage, then `[DONE]`."""
    for choice in result["choices"]:
        chunk = {key: result[key] for key in ("id", "object", "created", "model")}
        chunk["choices"] = [choice]
        yield f"data: {json.dumps(chunk)}\n\n".encode()
    yield f"data: {json.dumps({'id': result['id'], 'choices': [], 'usage': result['usage']})}\n\n".encode()
    yield b"data: [DONE]\n\n"
