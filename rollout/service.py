"""RolloutServicer: anvil.v1.RolloutService over an engine and its WeightUpdater.

Requests are validated completely here, before an engine sees them (the engine may be a vLLM process
that would fail less clearly); every rejection is a protos.errors exception with the field named.
Each response names the weight version that produced it; Sample names it per token too, because an
in-flight swap (rollout/weights.py) may land between two tokens of a running request.
"""

from __future__ import annotations

import math
from pathlib import Path

from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.errors import FailedPrecondition, InvalidArgument
from protos.registration import with_request_deserializers
from protos.weights_codec import parse_push_request
from protos.weights_relay import relay_chain
from rollout.engines.base import PromptScoring, RolloutEngine, SamplingSpec
from rollout.relay import RelayForward
from rollout.weights import WeightUpdater

SERVICE_NAME = "anvil.v1.RolloutService"
STOP_REASONS = {"stop": common_pb2.STOP_REASON_STOP, "length": common_pb2.STOP_REASON_LENGTH}


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(
        self,
        engine: RolloutEngine,
        updater: WeightUpdater,
        model_name: str,
        relay_api_key: str | None = None,
        max_samples_per_request: int = 1024,
    ) -> None:
        self.engine = engine
        self.max_samples_per_request = max_samples_per_request
        self.updater = updater
        self.model_name = model_name
        self.relay_api_key = relay_api_key
        """The key this replica sends when it relays weights to the next replica (the fleet shares one)."""

    async def GetInfo(self, request, context):
        description = self.engine.description
        return rollout_pb2.RolloutServiceGetInfoResponse(
            engine=description.engine,
            base_model=self.model_name,
            model_path=str(description.model_path),
            vocab_size=description.vocab_size,
            max_context_length=description.max_context_length,
            weight_version=self.engine.weight_version,
        )

    def _check_tokens(self, field: str, tokens: list[int]) -> None:
        description = self.engine.description
        if not tokens:
            raise InvalidArgument(f"{field} is empty; send at least one token id")
        bad = next((t for t in tokens if not 0 <= t < description.vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"{field} holds token id {bad}; token ids must be in [0, {description.vocab_size})")

    def prompt_scoring(self, request: rollout_pb2.SampleRequest) -> PromptScoring:
        """What the request scores on its prompt, range-checked (positions 1..n-1, ids in the vocabulary)."""
        vocab, length = self.engine.description.vocab_size, len(request.prompt_tokens)
        if not 0 <= request.prompt_logprobs_top_k <= vocab:
            raise InvalidArgument(f"prompt_logprobs_top_k is {request.prompt_logprobs_top_k}; give 0 to {vocab}")
        positions, tokens = list(request.prompt_target_positions), list(request.prompt_target_tokens)
        if len(positions) != len(tokens):
            raise InvalidArgument(
                f"prompt_target_positions has {len(positions)} entries and prompt_target_tokens {len(tokens)}; "
                "give one position per token"
            )
        bad = next((p for p in positions if not 1 <= p < length), None)
        if bad is not None:
            raise InvalidArgument(f"prompt_target_positions holds {bad}; positions are 1 to {length - 1}")
        if tokens:
            self._check_tokens("prompt_target_tokens", tokens)
        return PromptScoring(
            request.include_prompt_logprobs, request.prompt_logprobs_top_k, tuple(zip(positions, tokens, strict=True))
        )

    def sampling_spec(self, request: rollout_pb2.SampleRequest) -> SamplingSpec:
        """Resolve and range-check a request's sampling settings (InvalidArgument names the field)."""
        params = request.sampling_params
        context = self.engine.description.max_context_length
        room = context - len(request.prompt_tokens)
        if room <= 0:
            raise InvalidArgument(
                f"prompt_tokens has {len(request.prompt_tokens)} tokens, leaving no room in the {context}-token "
                "context; shorten the prompt"
            )
        if request.return_routed_experts and not self.engine.records_routes:
            raise FailedPrecondition(
                f"return_routed_experts: the {self.engine.description.engine} engine cannot record routed experts "
                "here (vLLM does only on GPUs); serve with the torch engine, or turn routing replay off"
            )
        if request.num_samples <= 0:
            raise InvalidArgument(f"num_samples is {request.num_samples}; ask for at least 1")
        if request.num_samples > self.max_samples_per_request:
            raise InvalidArgument(
                f"num_samples is {request.num_samples}; this replica takes at most {self.max_samples_per_request} "
                "per request (rollout max_samples_per_request): send several requests"
            )
        if params.max_tokens < 0 or params.max_tokens > room:
            raise InvalidArgument(
                f"sampling_params.max_tokens is {params.max_tokens}; it must be in [1, {room}] (the context left "
                "after the prompt), or 0 for all of it"
            )
        temperature = params.temperature if params.HasField("temperature") else 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidArgument(f"sampling_params.temperature is {temperature}; it must be >= 0 (0 = greedy)")
        top_p = params.top_p if params.HasField("top_p") else 1.0
        if not 0 < top_p <= 1:
            raise InvalidArgument(f"sampling_params.top_p is {top_p}; it must be in (0, 1]")
        if params.top_k < -1:
            raise InvalidArgument(f"sampling_params.top_k is {params.top_k}; use -1 (off) or a positive count")
        if params.stop_token_ids:
            self._check_tokens("sampling_params.stop_token_ids", list(params.stop_token_ids))
        if any(not stop for stop in params.stop_strings):
            raise InvalidArgument("sampling_params.stop_strings holds an empty string; remove it")
        return SamplingSpec(
            max_tokens=params.max_tokens or room,
            temperature=temperature,
            top_p=top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            seed=params.seed if params.HasField("seed") else None,
            stop_strings=tuple(params.stop_strings),
            stop_token_ids=tuple(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            return_routed_experts=request.return_routed_experts,
        )

    async def Sample(self, request, context):
        prompt = list(request.prompt_tokens)
        self._check_tokens("prompt_tokens", prompt)
        spec = self.sampling_spec(request)
        scoring = self.prompt_scoring(request)
        async with self.updater.gate.reading():  # only a "drain" swap waits for it
            version = self.engine.weight_version
            result = await self.engine.sample(prompt, request.num_samples, spec, scoring)
        # An engine that cannot swap in flight labels no token: all of them come from the version it started on.
        per_token = [s.token_versions or [version] * len(s.tokens) for s in result.sequences]
        return rollout_pb2.SampleResponse(
            sequences=[
                rollout_pb2.SampledSequence(
                    tokens=sequence.tokens,
                    logprobs=sequence.logprobs,
                    stop_reason=STOP_REASONS[sequence.stop_reason],
                    token_weight_versions=versions,
                    routed_experts=[] if sequence.routed_experts is None else sequence.routed_experts.view(-1).tolist(),
                )
                for sequence, versions in zip(result.sequences, per_token, strict=True)
            ],
            routed_moe_layers=result.routing_shape[0],
            routed_top_k=result.routing_shape[1],
            prompt_logprobs=result.prompt_logprobs or [],
            prompt_topk_tokens=[token for row in result.prompt_topk or [] for token, _ in row],
            prompt_topk_logprobs=[logprob for row in result.prompt_topk or [] for _, logprob in row],
            prompt_target_logprobs=result.prompt_target_logprobs or [],
            weight_version=min((v for versions in per_token for v in versions), default=version),
        )

    async def ComputeLogprobs(self, request, context):
        tokens = list(request.tokens)
        self._check_tokens("tokens", tokens)
        context_length = self.engine.description.max_context_length
        if len(tokens) > context_length:
            raise InvalidArgument(f"tokens has {len(tokens)} ids; the context is {context_length}")
        async with self.updater.gate.reading():
            while True:  # an in-flight swap between the two reads may have split the pass: score again
                version = self.engine.weight_version
                logprobs = await self.engine.compute_logprobs(tokens) if len(tokens) > 1 else []
                if self.engine.weight_version == version:
                    break
        return rollout_pb2.ComputeLogprobsResponse(logprobs=logprobs, weight_version=version)

    async def BeginWeightUpdate(self, request, context):
        base, base_digest = await self.updater.begin(request.version, request.rewind)
        return rollout_pb2.BeginWeightUpdateResponse(
            version=request.version, delta_base=base, delta_base_digest=base_digest
        )

    async def PushWeights(self, request_iterator, context):
        chain, stall_s = relay_chain(context.invocation_metadata() or ())
        if not chain:
            chunks, num_bytes = await self.updater.push(request_iterator)
            return rollout_pb2.PushWeightsResponse(num_chunks=chunks, num_bytes=num_bytes)
        relay = RelayForward(chain, stall_s, self.relay_api_key)

        async def forwarded():
            async for request in request_iterator:
                await relay.offer(getattr(request, "raw", b"") or request.SerializeToString())  # on its way first
                yield request

        try:
            chunks, num_bytes = await self.updater.push(forwarded())
        except BaseException:
            await relay.cancel()
            raise
        relayed = await relay.finish()
        return rollout_pb2.PushWeightsResponse(num_chunks=chunks, num_bytes=num_bytes, relayed=relayed)

    async def CommitWeightUpdate(self, request, context):
        seconds = await self.updater.commit(request.version, request.digest)
        return rollout_pb2.CommitWeightUpdateResponse(version=request.version, swap_duration_s=seconds)

    async def AbortWeightUpdate(self, request, context):
        await self.updater.abort(request.version)
        return rollout_pb2.AbortWeightUpdateResponse()

    async def LoadWeights(self, request, context):
        if not request.path:
            raise InvalidArgument("path is empty; pass the directory SaveWeights returned")
        path = Path(request.path)
        if path.is_file():  # a shared-memory segment of the learner's shm transport
            seconds = await self.updater.load_segment(path, request.version, request.rewind)
        else:
            seconds = await self.updater.load_directory(path, request.version, request.rewind)
        return rollout_pb2.LoadWeightsResponse(version=request.version, load_duration_s=seconds)


add_rollout_service = with_request_deserializers(
    rollout_pb2_grpc.add_RolloutServiceServicer_to_server, SERVICE_NAME, {"PushWeights": parse_push_request}
)
"""The generated registration, except that PushWeights requests are parsed without copying the data: the
receive path keeps a view into the gRPC message and copies it once, into the staged tensor
(`protos.weights_codec.parse_push_request`). `updater.push` reads both forms alike."""
