"""The Objective interface: what the RL loop asks of a training objective once a batch is scored.

The loop samples, scores and filters stale groups; an objective turns the fresh groups into datums and a
loss, runs the learner's forward/backward passes for them, and reports what it measured. The optimizer
step and the weight broadcast stay in the loop, so every objective gets them the same way. The maths an
objective uses lives in `coordinator.objectives.maths`; the losses themselves in `learner/losses.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import SampledSequence
from coordinator.envs.base import Problem


@dataclass
class ScoredGroup:
    """One prompt's samples, scored, with the weight version that sampled them."""

    batch: int
    problem: Problem
    prompt: list[int]
    sequences: list[SampledSequence]
    rewards: list[float]
    correct: list[float]
    sampler_version: int
    sample_s: float


class Objective(ABC):
    streams: bool = False
    """Whether a batch may train in passes as its groups arrive (`accumulate_part`): true when a group's
    datums depend on that group alone, up to one factor of the whole batch (`batch_grad_scale`)."""

    @abstractmethod
    async def accumulate_gradients(
        self, session: LearnerSession, groups: list[ScoredGroup], metrics: dict[str, float]
    ) -> np.ndarray | None:
        """Run this step's forward/backward passes for `groups` (gradients accumulate on the learner until
        the loop's optim_step); add metrics (`loss/sum` at least when anything trained). Return the
        learner's logprobs of every sampled completion token, in group order, when the passes produced
        them (the loop logs the sampler/learner KL from them), else None."""


def completion_logprobs(outputs: list[dict], sequences: list[SampledSequence]) -> np.ndarray:
    """The completion part of each datum's output logprobs, concatenated (float64)."""
    parts = [o["logprobs"].to_numpy()[-len(s.tokens) :] for o, s in zip(outputs, sequences, strict=True)]
    return np.concatenate(parts).astype(np.float64) if parts else np.zeros(0)

    async def accumulate_part(
        self, session: LearnerSession, groups: list[ScoredGroup], metrics: dict[str, float]
    ) -> np.ndarray | None:
        """One pass of a streamed batch: as `accumulate_gradients` for some of its groups, leaving out the
        factor the whole batch shares, which the loop's optim_step applies (`batch_grad_scale`). Only
        for objectives that stream; `loss/sum` in `metrics` is the pass's, without that factor."""
        raise NotImplementedError(f"{type(self).__name__} trains whole batches only")

    def batch_grad_scale(self, groups: list[ScoredGroup]) -> float:
        """The factor of a streamed batch's gradient that needs all its `groups` (given to optim_step)."""
        return 1.0
