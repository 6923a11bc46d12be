"""The PyTorch reference engine: the learner's Hugging Face model class, batched over the samples of a
request, decoding with a KV cache.

It exists for machines without vLLM and for exact-parity tests: its logprobs are the same float32
log-softmax the learner computes. Requests run one at a time (an asyncio lock) in a worker thread;
the `num_samples` of one request decode together as a batch. Sampling order matches vLLM's: temperature,
then top-k, then top-p, then a draw from a generator seeded per request.

In-flight swaps: every forward pass is one step of a TokenBoundary, and a swap holds the boundary, so it
waits for the step in progress only. The version read inside a step labels the token sampled from that
step's logits. With `inflight_kv = "recompute"`, the first step after a swap re-runs the whole sequence so
far (prompt and tokens) with the new weights instead of extending the KV cache the old ones computed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from protos.checkpoint_names import CheckpointLayout, live_tensors
from protos.errors import FailedPrecondition
from protos.moe_routing import recording, routing_shape
from rollout.config import TorchEngineConfig
from rollout.engines.base import (
    EngineDescription,
    GeneratedSequence,
    PromptScoring,
    RolloutEngine,
    SampleResult,
    SamplingSpec,
    score_prompt,
)
from rollout.engines.boundary import TokenBoundary


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_tokens(logits_NV: torch.Tensor, spec: SamplingSpec, generator: torch.Generator) -> torch.Tensor:
    """Next token per row: greedy at temperature 0, else a seeded draw after top-k and top-p filtering."""
    if spec.temperature == 0:
        return logits_NV.argmax(dim=-1)
    scaled_NV = logits_NV / spec.temperature
    if spec.top_k > 0 and spec.top_k < scaled_NV.shape[-1]:
        kth_N1 = torch.topk(scaled_NV, spec.top_k, dim=-1).values[:, -1:]
        scaled_NV = scaled_NV.masked_fill(scaled_NV < kth_N1, float("-inf"))
    probs_NV = torch.softmax(scaled_NV, dim=-1)
    if spec.top_p < 1.0:
        sorted_probs, order = probs_NV.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > spec.top_p  # always keeps the top token
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs_NV = torch.zeros_like(probs_NV).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs_NV.cpu(), 1, generator=generator)[:, 0].to(logits_NV.device)


class TorchEngine(RolloutEngine):
    records_routes = True

    def __init__(self, model_path: Path, config: TorchEngineConfig) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self._device = _resolve_device(config.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self._device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self._checkpoint_layout = CheckpointLayout(self.model)
        """Updates arrive by checkpoint name (fused experts split); this writes them into the parameters."""
        model_config = self.model.config
        eos = model_config.eos_token_id
        self._description = EngineDescription(
            engine="torch",
            model_path=model_path,
            vocab_size=int(model_config.vocab_size),
            max_context_length=int(model_config.max_position_embeddings),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
        self._lock = asyncio.Lock()
        """One request at a time (the samples of a request form the batch)."""
        self._boundary = TokenBoundary()
        self.swap_mode = config.swap
        self._recompute_kv = config.inflight_kv == "recompute"
        self._routing_shape = routing_shape(self.model)

    def swapping(self) -> contextlib.AbstractAsyncContextManager[None]:
        return self._boundary.swapping()

    @property
    def description(self) -> EngineDescription:
        return self._description

    async def sample(
        self, prompt_tokens: list[int], num_samples: int, spec: SamplingSpec, scoring: PromptScoring
    ) -> SampleResult:
        async with self._lock:
            return await asyncio.to_thread(self._sample, prompt_tokens, num_samples, spec, scoring)

    @torch.no_grad()
    def _sample(self, prompt: list[int], n: int, spec: SamplingSpec, scoring: PromptScoring) -> SampleResult:
        generator = torch.Generator().manual_seed(spec.seed if spec.seed is not None else random.getrandbits(63))
        input_ids_NL = torch.tensor([prompt] * n, device=self._device)
        record = self._routes_recorder(spec)
        with self._boundary.step():
            out, routes_NPLK = record(input_ids=input_ids_NL, use_cache=True)
            version = self.weight_version
        prompt_scores: dict = {"prompt_logprobs": None}
        if scoring != PromptScoring():
            prompt_scores = score_prompt(torch.log_softmax(out.logits[0, :-1].float(), dim=-1).cpu(), prompt, scoring)
        past, next_logits_NV = out.past_key_values, out.logits[:, -1].float()
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        versions: list[list[int]] = [[] for _ in range(n)]
        stopped = [False] * n
        for _ in range(spec.max_tokens):
            raw_logprobs_NV = torch.log_softmax(next_logits_NV, dim=-1)
            chosen_N = choose_tokens(next_logits_NV, spec, generator)
            chosen_logprobs = raw_logprobs_NV.gather(1, chosen_N[:, None])[:, 0].tolist()
            for row, token in enumerate(chosen_N.tolist()):
                if stopped[row]:
                    continue
                tokens[row].append(token)
                logprobs[row].append(chosen_logprobs[row])
                versions[row].append(version)
                stopped[row] = self._is_stop(tokens[row], spec)
            if all(stopped):
                break
            input_ids_NL = torch.cat([input_ids_NL, chosen_N[:, None]], dim=1)
            with self._boundary.step():
                if self._recompute_kv and self.weight_version != version:  # every position routed anew
                    out, routes_NPLK = record(input_ids=input_ids_NL, use_cache=True)
                else:
                    out, step_routes = record(input_ids=chosen_N[:, None], past_key_values=past, use_cache=True)
                    routes_NPLK = None if step_routes is None else torch.cat([routes_NPLK, step_routes], dim=1)
                version = self.weight_version
            past, next_logits_NV = out.past_key_values, out.logits[:, -1].float()
        sequences = [
            GeneratedSequence(
                tokens[row], logprobs[row], "stop" if stopped[row] else "length", versions[row],
                None if routes_NPLK is None else routes_NPLK[row, : len(prompt) + len(tokens[row]) - 1].clone(),
            )
            for row in range(n)
        ]  # fmt: skip
        return SampleResult(
            sequences, **prompt_scores, routing_shape=self._routing_shape if spec.return_routed_experts else (0, 0)
        )

    def _routes_recorder(self, spec: SamplingSpec) -> Callable[..., tuple[Any, torch.Tensor | None]]:
        """A forward that also returns, with spec.return_routed_experts, the experts each input position was
        routed to as [rows, positions, moe_layers, top_k] (protos.moe_routing), else None."""
        if not spec.return_routed_experts:
            return lambda **inputs: (self.model(**inputs), None)
        if self._routing_shape == (0, 0):
            raise FailedPrecondition("return_routed_experts needs a Mixture-of-Experts model; this one is dense")

        def forward(**inputs: Any) -> tuple[Any, torch.Tensor]:
            with recording(self.model) as recorder:
                out = self.model(**inputs)
            (routes_ULK,) = recorder.forwards()  # U = rows x positions, flattened as the routers saw them
            return out, routes_ULK.view(*inputs["input_ids"].shape, *routes_ULK.shape[1:])

        return forward

    def _is_stop(self, generated: list[int], spec: SamplingSpec) -> bool:
        last = generated[-1]
        if not spec.ignore_eos and last == self._description.eos_token_id:
            return True
        if last in spec.stop_token_ids:
            return True
        if spec.stop_strings:
            text = self.tokenizer.decode(generated)
            return any(stop in text for stop in spec.stop_strings)
        return False

    async def compute_logprobs(self, tokens: list[int]) -> list[float]:
        async with self._lock:
            return await asyncio.to_thread(self._compute_logprobs, tokens)

    @torch.no_grad()
    def _compute_logprobs(self, tokens: list[int]) -> list[float]:
        ids_1L = torch.tensor([tokens], device=self._device)
        with self._boundary.step():
            logits_LV = self.model(input_ids=ids_1L).logits[0, :-1]
        logprobs_LV = torch.log_softmax(logits_LV.float(), dim=-1)
        return logprobs_LV.gather(1, ids_1L[0, 1:, None])[:, 0].tolist()

    async def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in place; the caller holds `swapping()`, so no step reads the parameters meanwhile (not the
        request lock: that would wait for the whole generation in progress)."""
        await asyncio.to_thread(self._copy_in, tensors)

    @torch.no_grad()
    def _copy_in(self, tensors: dict[str, torch.Tensor]) -> None:
        self._checkpoint_layout.load(live_tensors(self.model), tensors)

    async def close(self) -> None:
        async with self._lock:
            self.model = None
