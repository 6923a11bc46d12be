"""Policy gradient with a Tinker built-in loss (importance_sampling, ppo, cispo) on group-relative
advantages, with optional truncated importance sampling (one extra Forward per step)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import Datum, SampledSequence
from coordinator.objectives.base import Objective, ScoredGroup, completion_logprobs
from coordinator.objectives.maths import (
    batch_advantages,
    batch_loss_scale,
    group_advantages,
    loss_scales,
    policy_datum,
    sequence_loss_scales,
    truncated_is_weights,
)


class AdvantageConfig(BaseModel):
    """How rewards become advantages (shared by the objectives that use advantages)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    advantage_baseline: Literal["group", "batch"] = "group"
    """Subtract the group's mean reward (GRPO) or the whole batch's. The batch baseline keeps a signal
    when every sample of a group is equally wrong (a collapsed policy): their advantage is negative."""
    normalize_advantages: bool = True
    """Divide the centred rewards by the std of the same population (group or batch)."""

    def advantages(self, groups: list[ScoredGroup]) -> list[list[float]]:
        if self.advantage_baseline == "batch":
            return batch_advantages([g.rewards for g in groups], self.normalize_advantages)
        return [group_advantages(g.rewards, self.normalize_advantages) for g in groups]

    def entries(self, groups: list[ScoredGroup]) -> list[tuple[list[int], SampledSequence, float]]:
        """(prompt, sampled sequence, advantage) for every non-empty completion, in group order."""
        entries = []
        for group, advantages in zip(groups, self.advantages(groups), strict=True):
            entries += [(group.prompt, s, a) for s, a in zip(group.sequences, advantages, strict=True) if s.tokens]
        return entries


class PolicyGradientConfig(AdvantageConfig):
    type: Literal["importance_sampling", "ppo", "cispo"] = "importance_sampling"
    """The learner's built-in policy-gradient loss (see docs/losses.md)."""
    loss_config: dict[str, float] = Field(default_factory=dict)
    """The loss's settings (clip_low_threshold / clip_high_threshold for ppo and cispo)."""
    loss_normalization: Literal["sum", "token_mean", "sequence_mean", "constant"] = "sum"
    """How the per-token loss terms of a step add up (coordinator.objectives.maths.loss_scales): `sum` as
    Tinker's losses are (every token counts 1), `token_mean` as DAPO (and TRL's default), `sequence_mean`
    as GRPO first did, `constant` as Dr. GRPO (divided by `constant_tokens` x sequences). Applied by
    scaling each sequence's advantages, which every built-in loss is linear in."""
    constant_tokens: int | None = Field(default=None, ge=1)
    """The token budget of the `constant` normalisation; unset, the run's `loop.max_tokens`."""
    tis_cap: float | None = Field(default=None, gt=0)
    """Truncated importance sampling: scale advantages by min(p_learner / p_sampler, cap) per token
    (one extra Forward per step). None disables."""


class PolicyGradient(Objective):
    def __init__(self, config: PolicyGradientConfig) -> None:
        self.config = config
        # Group baselines make each group's advantages its own; a batch baseline needs every reward first.
        self.streams = config.advantage_baseline == "group"

    async def accumulate_gradients(
        self, session: LearnerSession, groups: list[ScoredGroup], metrics: dict[str, float]
    ) -> np.ndarray | None:
        config = self.config
        return await self._passes(
            session, config.entries(groups), lambda lengths: loss_scales(
                lengths, config.loss_normalization, config.constant_tokens
            ), metrics,
        )  # fmt: skip

    async def accumulate_part(
        self, session: LearnerSession, groups: list[ScoredGroup], metrics: dict[str, float]
    ) -> np.ndarray | None:
        if not self.streams:
            raise NotImplementedError("a batch advantage baseline needs the whole batch: it cannot stream")
        normalization = self.config.loss_normalization
        return await self._passes(
            session, self.config.entries(groups), lambda lengths: sequence_loss_scales(lengths, normalization), metrics
        )

    def batch_grad_scale(self, groups: list[ScoredGroup]) -> float:
        lengths = [len(s.tokens) for _, s, _ in self.config.entries(groups)]
        return batch_loss_scale(lengths, self.config.loss_normalization, self.config.constant_tokens)

    async def _passes(
        self,
        session: LearnerSession,
        entries: list[tuple[list[int], SampledSequence, float]],
        scales_of: Callable[[list[int]], list[float]],
        metrics: dict[str, float],
    ) -> np.ndarray | None:
        """Forward/backward of `entries` with each sequence's advantages times its loss factor."""
        config = self.config
        if not entries:
            return None
        scales = scales_of([len(s.tokens) for _, s, _ in entries])
        entries = [(p, s, a * scale) for (p, s, a), scale in zip(entries, scales, strict=True)]
        data = [
            policy_datum(p, s.tokens, s.logprobs, a, s.token_weight_versions, s.routed_experts) for p, s, a in entries
        ]
        if config.tis_cap is not None:
            data = await self._truncated_is(session, entries, data, metrics)
        result = await session.forward_backward(data, config.type, config.loss_config)
        metrics["loss/sum"] = result.metrics["loss:sum"]
        # The learner's own: tokens/s, peak memory, micro-batches of the step (learner/backends/packing.py).
        metrics.update({k.split(":")[0]: v for k, v in result.metrics.items() if k.startswith("learner/")})
        return completion_logprobs(result.loss_fn_outputs, [s for _, s, _ in entries])

    async def _truncated_is(
        self, session: LearnerSession, entries: list, data: list[Datum], metrics: dict[str, float]
    ) -> list[Datum]:
        learner = await session.forward(data, self.config.type, self.config.loss_config)
        weighted = []
        for (prompt, sequence, advantage), output in zip(entries, learner.loss_fn_outputs, strict=True):
            learner_lp = output["logprobs"].to_numpy()[-len(sequence.tokens) :]
            weights = truncated_is_weights(learner_lp, np.asarray(sequence.logprobs), self.config.tis_cap)
            advantage_T = (advantage * weights).tolist()
            weighted.append(
                policy_datum(
                    prompt,
                    sequence.tokens,
                    sequence.logprobs,
                    advantage_T,
                    sequence.token_weight_versions,
                    sequence.routed_experts,
                )
            )
        metrics["tis/weight_mean"] = float(np.mean([w for d in weighted for w in d.loss_fn_inputs["advantages"].data]))
        return weighted
