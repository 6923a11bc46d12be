"""Sampling clients and their samples: a sampling session is bound to one set of weights (the base model,
a named sampler checkpoint, or an unnamed snapshot), and `asample` turns Tinker's request into a rollout
`Sample` on a replica that serves exactly those weights (the SnapshotRouter hot-loads them if needed).

A sample is deduplicated by (sampling session, seq_id): a retried `asample` gets the first request id.
Top-k and target prompt logprobs go to the replica with the sample (coordinator.gateway.prompt_scores).
Tinker features Anvil does not serve (top-k sample logprobs, prompt alternatives, image chunks) are user
errors, never silently ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coordinator.gateway.bodies import NewSampler, Sample, SampleEnvelope, SamplingParams, parse
from coordinator.gateway.checkpoints import CheckpointStore
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.futures import FutureStore
from coordinator.gateway.journal import OpRecord
from coordinator.gateway.prompt_scores import parse_targets, topk_of
from coordinator.gateway.results import SampleResult
from coordinator.gateway.sampling_models import SamplingOnlyModels
from coordinator.gateway.sessions import SamplingSession, SessionRegistry
from coordinator.gateway.snapshot_router import SnapshotRouter
from coordinator.gateway.wire import prompt_logprobs_of
from coordinator.models import same_model
from protos.anvil.v1 import common_pb2, rollout_pb2
from protos.errors import FailedPrecondition, InvalidArgument, NotFound

UNSUPPORTED_FIELDS = (
    ("topk_sample_logprobs", "top-k sample logprobs"),
    ("prompt_alt_tokens_k", "prompt alternative tokens"),
)
STABILITY_INFO_REFUSAL = (
    "record_stability_info=True records samples for loss_fn='stable_reinforce', Tinker's proprietary loss (its "
    "maths is unpublished), which this server does not offer: create the sampling client with "
    "record_stability_info=False and train with loss_fn='importance_sampling' (or ppo, cispo, gspo) - in "
    "tinker-cookbook, set loss_fn='importance_sampling' in the RL config"
)
"""Refused at the first sample, before any rollout is spent on a run whose training step would refuse it."""
SAMPLING_FIELDS = {"max_tokens", "seed", "stop", "temperature", "top_k", "top_p"}


class Sampling:
    def __init__(
        self,
        config: GatewayConfig,
        model_dir: Path,
        sessions: SessionRegistry,
        futures: FutureStore,
        checkpoints: CheckpointStore,
        router: SnapshotRouter | None,
        sampling_only: SamplingOnlyModels | None = None,
    ) -> None:
        self.config = config
        self.model_dir = model_dir
        self.sessions = sessions
        self.futures = futures
        self.checkpoints = checkpoints
        self.router = router
        """The rollout replicas; None on a trainer job's gateway (it samples through a deployment)."""
        self.sampling_only = sampling_only or SamplingOnlyModels([])
        """Teachers and graders served beside the trained model, each by its own replicas."""

    def create_session(self, body: dict[str, Any]) -> dict[str, Any]:
        envelope = parse(NewSampler, body)
        session = self.sessions.get(envelope.session_id)
        sampler_id = f"{session.session_id}:sample:{envelope.sampling_session_seq_id}"
        if sampler_id not in session.samplers:
            if envelope.model_path:
                record = self.checkpoints.get(envelope.model_path)
                if record.kind == "weights":
                    raise FailedPrecondition(
                        f"{record.path} is a training state; sample from a save_weights_for_sampler path "
                        "(tinker://…/sampler_weights/…)"
                    )
                sampler = SamplingSession(sampler_id, record.base_model, Path(record.local_path), record.path)
            elif extra := self.sampling_only.find(envelope.base_model):
                sampler = SamplingSession(sampler_id, extra.name, extra.model_dir)
            else:
                base_model = self.config.check_base_model(envelope.base_model, self.model_dir)
                sampler = SamplingSession(sampler_id, base_model, self.model_dir)
            self.sessions.add_sampler(session, sampler)
        return {"type": "create_sampling_session", "sampling_session_id": sampler_id}

    def describe(self, sampler_id: str) -> dict[str, Any]:
        sampler = self.sessions.sampler(sampler_id)
        return {"sampler_id": sampler_id, "base_model": sampler.base_model, "model_path": sampler.model_path}

    def asample(self, body: dict[str, Any]) -> dict[str, Any]:
        envelope = parse(SampleEnvelope, body)  # a bad id or count is a 4xx; the rest fails the future
        if envelope.record_stability_info:
            raise InvalidArgument(STABILITY_INFO_REFUSAL)
        sampler = self.sessions.sampler(envelope.sampling_session_id)
        seq_id = envelope.seq_id
        if seq_id not in sampler.requests:  # new work (a retried seq_id gets its first answer)
            if not sampler.snapshot.exists():
                raise NotFound(self._weights_gone(sampler))
            self.sessions.touch_snapshot(sampler)
            self.start(sampler, seq_id, body)
        ids = [f"{sampler.sampling_session_id}:{seq_id}:{index}" for index in range(envelope.num_samples)]
        return {"request_id": sampler.requests[seq_id], "sample_sequence_ids": ids}

    def _weights_gone(self, sampler: SamplingSession) -> str:
        """Why a sampling client's weights are no longer on disk."""
        if sampler.model_path:
            return f"the sampler weights {sampler.model_path} were deleted; save new ones with save_weights_for_sampler"
        return (
            f"the weights of sampling client {sampler.sampling_session_id!r} were deleted: a training client keeps "
            f"its {self.config.sampler_snapshots_kept} most recently used unnamed snapshots (sampler_snapshots_kept); "
            "save_weights_for_sampler with a name keeps weights for good"
        )

    def start(self, sampler: SamplingSession, seq_id: int, body: dict[str, Any], request_id: str | None = None) -> None:
        """Run sample `seq_id` of `sampler` (under `request_id` when it is one from before a restart); the
        journal keeps its body until it finishes, so a restart in between runs it again."""
        journal = self.sessions.journal

        async def work() -> SampleResult:
            try:
                return await self._sample(sampler, body)
            finally:
                if journal is not None and self.futures.journal is not None:  # not while the server stops
                    journal.forget_bodies(sampler.sampling_session_id, seq_id)

        sampler.requests[seq_id] = self.futures.run("sample", work, request_id)
        if journal is not None and request_id is None:
            raw = json.dumps(body).encode()
            request_id = sampler.requests[seq_id]
            journal.op_accepted(OpRecord(request_id, sampler.sampling_session_id, seq_id, "sample", None, "json", raw))

    async def _sample(self, sampler: SamplingSession, body: dict[str, Any]) -> SampleResult:
        given = parse(Sample, body)
        for field, what in UNSUPPORTED_FIELDS:
            if getattr(given, field):
                raise InvalidArgument(f"{field} ({what}) is not supported by this server; leave it at 0")
        prompt = []
        for chunk in given.prompt.chunks:
            if chunk.type != "encoded_text":
                raise InvalidArgument(f"prompt has a {chunk.type!r} chunk; Anvil's models read text tokens")
            prompt.extend(chunk.tokens)
        if not prompt:
            raise InvalidArgument("the prompt is empty; send at least one token")
        params = self._sampling_params(given.sampling_params or SamplingParams())
        want_prompt_logprobs = bool(given.prompt_logprobs)
        top_k = given.topk_prompt_logprobs or 0
        if top_k < 0:
            raise InvalidArgument(f"topk_prompt_logprobs is {top_k}; give 0 (none) or a positive k")
        targets = None
        if given.target_prompt_logprobs is not None:
            targets = parse_targets(given.target_prompt_logprobs, len(prompt))
        request = rollout_pb2.SampleRequest(
            prompt_tokens=prompt,
            num_samples=given.num_samples,
            sampling_params=params,
            include_prompt_logprobs=want_prompt_logprobs,
            prompt_logprobs_top_k=top_k if len(prompt) > 1 else 0,
            prompt_target_positions=targets.positions if targets else [],
            prompt_target_tokens=targets.tokens if targets else [],
        )
        router = self.sampling_only.router_for(sampler.base_model)
        if router is None and not same_model(sampler.base_model, self.config.model, self.model_dir):
            raise FailedPrecondition(
                f"{sampler.base_model!r} is no longer served here (not in sampling_models since a restart); "
                f"sample {self.config.model!r} or a model the server lists in get_server_capabilities"
            )
        router = router or self.router
        if router is None:
            raise FailedPrecondition("this trainer has no sampler; sample from a deployment (hot-load a snapshot)")
        reply = await router.run(sampler.snapshot, lambda stub: stub.Sample(request))
        prompt_logprobs = (
            prompt_logprobs_of(reply, len(prompt), given.prompt_logprobs_last_n) if want_prompt_logprobs else None
        )
        last_n = given.prompt_logprobs_last_n
        return SampleResult(
            reply,
            prompt_logprobs,
            topk_of(reply, len(prompt), top_k, last_n) if top_k and len(prompt) > 1 else None,
            targets.answer(list(reply.prompt_target_logprobs)) if targets else None,
        )

    def _sampling_params(self, given: SamplingParams) -> common_pb2.SamplingParams:
        from coordinator.client import types
        from coordinator.client.convert import sampling_params_to_proto

        fields = given.model_dump(exclude_unset=True)
        unknown = sorted(set(fields) - SAMPLING_FIELDS)
        if unknown:
            raise InvalidArgument(f"sampling_params has unknown field(s) {unknown}; allowed: {sorted(SAMPLING_FIELDS)}")
        params = types.SamplingParams(**{k: v for k, v in fields.items() if v is not None or k == "stop"})
        if params.max_tokens is None:
            params.max_tokens = self.config.default_max_tokens
        try:
            return sampling_params_to_proto(params)
        except (TypeError, ValueError) as exc:  # a value out of the wire's range (protobuf says which)
            raise InvalidArgument(f"sampling_params: {exc}") from None
