"""What one step of the RL loop trains on and reports: its batch's groups as they are scored (in passes,
so the learner can start on the first groups while the rest are still sampled), the statistics of the
samples, and the metrics of its passes merged into the step's."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import numpy as np

from coordinator.objectives import ScoredGroup


class BatchArrivals:
    """The groups of one batch as the samplers score them. Groups of later batches that arrive meanwhile
    (sampled ahead, within the staleness bound) are kept in `pending` for their own step."""

    def __init__(self, scored: asyncio.Queue, pending: defaultdict[int, list[ScoredGroup]], batch: int) -> None:
        self.scored, self.pending, self.batch = scored, pending, batch
        self.waited_s = 0.0
        """Time spent waiting for groups, over every `take`."""

    async def take(self, at_least: int) -> list[ScoredGroup]:
        """Wait for `at_least` groups of the batch not yet taken, then take every one scored by now, in
        problem order. A sampler's failure (an exception on the queue) is raised here."""
        start = time.perf_counter()
        arrived = self.pending.pop(self.batch, [])
        while len(arrived) < at_least:
            self._route(await self.scored.get(), arrived)
        while not self.scored.empty():
            self._route(self.scored.get_nowait(), arrived)
        self.waited_s += time.perf_counter() - start
        return sorted(arrived, key=lambda g: g.problem.index)

    def _route(self, item: ScoredGroup | Exception, arrived: list[ScoredGroup]) -> None:
        if isinstance(item, Exception):
            raise item
        (arrived if item.batch == self.batch else self.pending[item.batch]).append(item)


def sample_metrics(groups: list[ScoredGroup], fresh: list[ScoredGroup], step: int) -> dict[str, float]:
    """Rewards, staleness (per group and per token, against `step`) and sampling time of a batch."""
    staleness = [step - g.sampler_version for g in fresh]
    token_staleness = [step - v for g in fresh for s in g.sequences for v in s.token_weight_versions or []]
    return {
        "reward/mean": float(np.mean([r for g in groups for r in g.rewards])),
        "reward/std": float(np.std([r for g in groups for r in g.rewards])),
        "correct/mean": float(np.nanmean([c for g in groups for c in g.correct])),
        "staleness/mean": float(np.mean(staleness)) if staleness else 0.0,
        "staleness/max": float(max(staleness, default=0)),
        "staleness/token_mean": float(np.mean(token_staleness)) if token_staleness else 0.0,
        "sequences/mixed_versions": float(
            sum(len(set(s.token_weight_versions or [])) > 1 for g in fresh for s in g.sequences)
        ),
        "groups/dropped_stale": float(len(groups) - len(fresh)),
        "time/sample_mean_s": float(np.mean([g.sample_s for g in groups])),
    }


def sampler_logprobs(groups: list[ScoredGroup]) -> np.ndarray:
    """The sampler's logprob of every completion token of `groups`, in order (float64)."""
    parts = [np.asarray(s.logprobs, dtype=np.float64) for g in groups for s in g.sequences]
    return np.concatenate(parts) if parts else np.zeros(0)


def merge_pass_metrics(passes: list[dict[str, float]], loss_scale: float) -> dict[str, float]:
    """One step's metrics from those of its forward/backward passes: the loss summed (times the batch's
    factor, which the passes left to the optimizer step), micro-batches summed, peak memory the largest,
    every other metric (tokens/s, importance weights) averaged over the passes."""
    merged: dict[str, float] = {}
    for key in {key for metrics in passes for key in metrics}:
        values = [metrics[key] for metrics in passes if key in metrics]
        if key == "loss/sum":
            merged[key] = float(sum(values)) * loss_scale
        elif key == "learner/micro_batches":
            merged[key] = float(sum(values))
        elif key == "learner/peak_memory_gib":
            merged[key] = float(max(values))
        else:
            merged[key] = float(np.mean(values))
    merged["train/passes"] = float(len(passes))
    return merged
