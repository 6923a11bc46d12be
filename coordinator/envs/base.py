"""The environment interface of the RL loop: small, async, single-use.

A `ProblemSource` yields problems by index (deterministically: problem i is always the same, which is
what makes resume exact). An `Env` is one problem turned into a prompt and a verifier; the loop calls
`prompt_tokens()` once, samples completions, and calls `score()` once per completion (a group's
completions concurrently, so a verifier that waits costs its latency once per group). Rewards are in
[0, 1]. Envs are async so a verifier may call out (a sandbox, a judge) without blocking the loop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Problem:
    """One prompt of a task and what a right answer is."""

    index: int
    prompt: str
    answer: str


@dataclass(frozen=True)
class Score:
    reward: float
    """In [0, 1]."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Per-completion diagnostics, averaged into the step's metrics (e.g. correct: 0/1)."""


class Env(ABC):
    @abstractmethod
    async def prompt_tokens(self) -> list[int]: ...

    @abstractmethod
    async def score(self, completion_tokens: list[int]) -> Score: ...


class ProblemSource(ABC):
    """Problems by index; `num_problems` is None for endless generated tasks."""

    name: str

    @property
    @abstractmethod
    def num_problems(self) -> int | None: ...

    @abstractmethod
    def problem(self, index: int) -> Problem: ...
