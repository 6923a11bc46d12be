"""vLLM as the rollout engine: AsyncLLM, so concurrent Sample calls are batched continuously.

Imported lazily (only when the config asks for vLLM). On the CPU build the linear weights are packed at
load time, so parameters cannot be changed in place; new weights go through the worker's `reload_weights`
(layer-wise, re-packing; vllm_worker.py adds the MoE experts' repack), reached with `collective_rpc`.
Pushed tensors are first written as safetensors to a RAM-backed staging directory. If a reload fails
midway, the previous weights are reloaded from the directory they came from before the error is raised,
so a failed update never leaves a half-changed model serving.

In-flight swaps (`swap = "inflight"`): `swapping()` is vLLM's own token boundary,
`pause_generation(mode="keep")` (running requests freeze between two engine steps and keep their KV), then
the reload, then `update_weight_version` (vLLM labels every output token with the version set when its
step ran: CompletionOutput.weight_versions spans), then `resume_generation`. With `inflight_kv =
"recompute"` the running requests are preempted at the swap (`reset_prefix_cache(reset_running_requests=
True)`), so their KV is recomputed by the new weights before their next token. KV is never reused across
versions by accident: the prefix cache is reset at every swap where no request holds blocks, and every
request salts its prefix-cache hashes with the version served when it arrived (`cache_salt`, as PRIME-RL
does), so a request that starts after a swap never hits blocks that the old weights computed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from protos.errors import FailedPrecondition, InvalidArgument
from rollout.config import VllmEngineConfig
from rollout.engines.base import (
    EngineDescription,
    GeneratedSequence,
    PromptScoring,
    RolloutEngine,
    SampleResult,
    SamplingSpec,
)
from rollout.engines.vllm_cpu import engine_core_on_bound_cores
from rollout.engines.vllm_worker import RELOAD_WEIGHTS_RPC, WORKER_EXTENSION
from rollout.staging import new_staging_dir, remove_orphans


class VllmEngine(RolloutEngine):
    def __init__(self, engine, model_path: Path, config: VllmEngineConfig, description: EngineDescription) -> None:
        self._engine = engine
        self._config = config
        self._description = description
        self._model_path = model_path
        """The base model this replica started from: what LoRA adapters apply to."""
        self._serving_dir = model_path
        """Where the weights being served came from: the rollback source if a reload fails."""
        self._owned_dirs: set[Path] = set()
        self.swap_mode = config.swap
        self._adapters: list = []
        """LoRARequests loaded, newest last: the last one is served; the one before stays loaded for the
        requests that started on it (a request keeps its adapter to its end)."""
        self._adapter_ids = 0
        remove_orphans(config.staging_dir)  # what replicas killed before us left in tmpfs

    @contextlib.asynccontextmanager
    async def swapping(self) -> AsyncIterator[None]:
        """Pause at a step boundary (keep mode: requests stay, with their KV), swap, label, resume.

        The engine core's own pause: `AsyncLLM.pause_generation` adds a 20 ms sleep for aborted requests'
        last outputs ("not required for correctness"), a third of an anvil-tiny publication; none here."""
        await self._engine.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
        try:
            yield
        finally:
            try:
                await self._engine.reset_prefix_cache(reset_running_requests=self._config.inflight_kv == "recompute")
                await self._engine.update_weight_version(str(self.weight_version))
            finally:
                await self._engine.resume_generation()

    @classmethod
    def create(cls, model_path: Path, config: VllmEngineConfig) -> VllmEngine:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
        if config.disable_torch_compile:
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        extra = {"distributed_executor_backend": "uni"} if config.single_process_worker else {}
        # Two adapter slots: the one served, and the previous one while requests started on it finish.
        lora = {"enable_lora": True, "max_lora_rank": config.max_lora_rank, "max_loras": 2}
        lora = lora if config.max_lora_rank else {}
        args = AsyncEngineArgs(
            model=str(model_path),
            dtype=config.dtype,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            seed=config.seed,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            max_logprobs=config.max_logprobs,
            worker_extension_cls=WORKER_EXTENSION,  # the reload that repacks CPU MoE experts (vllm_worker.py)
            **extra,
            **lora,
        )
        placement = engine_core_on_bound_cores() if config.single_process_worker else contextlib.nullcontext()
        with placement:
            engine = AsyncLLM.from_engine_args(args)
        model_config = engine.model_config
        eos = model_config.hf_config.eos_token_id
        description = EngineDescription(
            engine="vllm",
            model_path=model_path,
            vocab_size=int(model_config.get_vocab_size()),
            max_context_length=int(model_config.max_model_len),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )
        return cls(engine, model_path, config, description)

    @property
    def description(self) -> EngineDescription:
        return self._description

    async def _final_output(self, prompt_tokens: list[int], params, adapter=None):
        """The one RequestOutput of a FINAL_ONLY request (CUMULATIVE outputs of n > 1 can miss children)."""
        final = None
        prompt = {"prompt_token_ids": prompt_tokens, "cache_salt": f"anvil-weights-v{self.weight_version}"}
        request_id = uuid.uuid4().hex
        async for output in self._engine.generate(prompt, params, request_id=request_id, lora_request=adapter):
            final = output
        return final

    async def load_adapter(self, directory: Path, layers) -> None:
        """Load the adapter into vLLM now (add_lora: a bad one fails here, while the previous one is still
        served) and serve it to requests from now on; adapters older than the previous one are dropped."""
        from vllm.lora.request import LoRARequest

        from rollout.adapters import adapter_rank

        rank = adapter_rank(directory)
        if not self._config.max_lora_rank or rank > self._config.max_lora_rank:
            raise FailedPrecondition(
                f"{directory} is a rank-{rank} LoRA adapter and this vLLM replica serves LoRA up to rank "
                f"{self._config.max_lora_rank} (0: off); start it with engine.max_lora_rank >= {rank}"
            )
        if self._serving_dir != self._model_path:  # full weights replaced the base since: back to it first
            await self.load_weights_from_directory(self._model_path)
        self._adapter_ids += 1  # never reused: vLLM knows an adapter by its id
        adapter = LoRARequest(f"anvil-{self._adapter_ids}", self._adapter_ids, str(directory))
        if not await self._engine.add_lora(adapter):
            raise FailedPrecondition(f"vLLM did not load the LoRA adapter in {directory}")
        self._adapters.append(adapter)
        await self._drop_adapters(keep=2)

    async def sample(
        self, prompt_tokens: list[int], num_samples: int, spec: SamplingSpec, scoring: PromptScoring
    ) -> SampleResult:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            n=num_samples,
            max_tokens=spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            top_k=spec.top_k if spec.top_k > 0 else -1,
            seed=spec.seed,
            stop=list(spec.stop_strings) or None,
            stop_token_ids=list(spec.stop_token_ids) or None,
            ignore_eos=spec.ignore_eos,
            include_stop_str_in_output=True,
            detokenize=bool(spec.stop_strings),  # text only to match stop strings: a third of the front end's CPU
            logprobs=0,  # the sampled token's logprob only
            prompt_logprobs=self._prompt_logprobs_setting(scoring),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        # A request keeps the adapter (and so the version) it started with: vLLM labels its tokens with the
        # version of each step, which is right for weights swapped in place, not for a request's adapter.
        adapter, version = (self._adapters[-1] if self._adapters else None), self.weight_version
        final = await self._final_output(prompt_tokens, params, adapter)
        if len(final.outputs) != num_samples:
            raise RuntimeError(f"vLLM returned {len(final.outputs)} completions for n={num_samples}")
        sequences = [
            GeneratedSequence(
                tokens=list(completion.token_ids),
                logprobs=[
                    step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
                ],
                stop_reason="length" if completion.finish_reason == "length" else "stop",
                token_versions=[version] * len(completion.token_ids)
                if adapter is not None
                else _token_versions(completion.weight_versions, len(completion.token_ids)),
            )
            for completion in sorted(final.outputs, key=lambda c: c.index)
        ]
        per_position = final.prompt_logprobs
        return SampleResult(
            sequences,
            _prompt_logprobs(per_position, prompt_tokens) if scoring.logprobs else None,
            _prompt_topk(per_position, scoring.top_k) if scoring.top_k else None,
            [per_position[p][t].logprob for p, t in scoring.targets] if scoring.targets else None,
        )

    def _prompt_logprobs_setting(self, scoring: PromptScoring) -> int | None:
        """vLLM's `prompt_logprobs` for `scoring`: None (none), k (the top k, plus the prompt's own token),
        or -1 (the whole vocabulary: the only way vLLM scores a token that is not in the top k)."""
        limit = self._config.max_logprobs
        if scoring.targets:
            if limit != -1:
                raise FailedPrecondition(
                    "target prompt logprobs need this vLLM replica's full-vocabulary prompt logprobs; start it "
                    "with max_logprobs = -1 (rollout engine setting), or sample from a torch-engine replica"
                )
            return -1
        if scoring.top_k:
            if limit != -1 and scoring.top_k > limit:
                raise InvalidArgument(
                    f"top-k prompt logprobs of {scoring.top_k} exceed this replica's max_logprobs ({limit}); ask for "
                    "at most that many, or start the replica with a larger max_logprobs"
                )
            return scoring.top_k
        return 0 if scoring.logprobs else None

    async def compute_logprobs(self, tokens: list[int]) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, logprobs=None, output_kind=RequestOutputKind.FINAL_ONLY
        )
        final = await self._final_output(tokens, params, self._adapters[-1] if self._adapters else None)
        return _prompt_logprobs(final.prompt_logprobs, tokens)

    async def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        directory = new_staging_dir(self._config.staging_dir)
        try:
            save_file({name: t.contiguous() for name, t in tensors.items()}, directory / "model.safetensors")
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._owned_dirs.add(directory)
        await self.load_weights_from_directory(directory)

    async def load_weights_from_directory(self, directory: Path) -> None:
        try:
            await self._reload(directory)
        except BaseException:
            await self._reload(self._serving_dir)  # roll back to what was served
            self._discard(directory)
            raise
        previous, self._serving_dir = self._serving_dir, directory
        self._discard(previous)
        await self._drop_adapters(keep=0)  # full weights: requests from now on run without an adapter

    async def _drop_adapters(self, keep: int) -> None:
        """Unload all but the newest `keep` adapters."""
        for old in self._adapters[: max(len(self._adapters) - keep, 0)]:
            await self._engine.remove_lora(old.lora_int_id)
        self._adapters = self._adapters[len(self._adapters) - keep :] if keep else []

    async def _reload(self, directory: Path) -> None:
        """The caller holds `swapping()`, which resets the prefix cache and labels the version after it."""
        await self._engine.collective_rpc(RELOAD_WEIGHTS_RPC, kwargs={"weights_path": str(directory)})

    def _discard(self, directory: Path) -> None:
        if directory in self._owned_dirs:
            self._owned_dirs.discard(directory)
            shutil.rmtree(directory, ignore_errors=True)

    async def close(self) -> None:
        self._engine.shutdown()
        for directory in list(self._owned_dirs):
            self._discard(directory)


def _token_versions(spans, num_tokens: int) -> list[int]:
    """vLLM's [start, end) version spans as one version per token; [] when vLLM labelled none. A label that
    is not a number is vLLM's initial "default": the base weights, version 0."""
    versions: list[int] = []
    for span in spans or []:
        versions.extend([int(span.version) if span.version.isdigit() else 0] * (span.end - span.start))
    if versions and len(versions) != num_tokens:  # never seen; keep the lengths in step rather than fail
        versions = (versions + [versions[-1]] * num_tokens)[:num_tokens]
    return versions


def _prompt_topk(per_position, k: int) -> list[list[tuple[int, float]]]:
    """The k most likely (token, logprob) at positions 1..n-1: vLLM adds the prompt's own token to its top
    k, with its rank, so the top k are the entries of rank <= k."""
    rows = []
    for entries in per_position[1:]:
        ranked = sorted(entries.items(), key=lambda item: item[1].rank)
        rows.append([(token, lp.logprob) for token, lp in ranked if lp.rank <= k][:k])
    return rows


def _prompt_logprobs(per_position, tokens: list[int]) -> list[float]:
    """vLLM's prompt_logprobs hold None for position 0, then {token: Logprob} per position."""
    return [per_position[i][tokens[i]].logprob for i in range(1, len(tokens))]
