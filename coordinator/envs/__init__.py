"""Environments and problem sources; `build_source` picks a built-in task or a dataset file."""

from __future__ import annotations

from pathlib import Path

from coordinator.envs.base import Env, Problem, ProblemSource, Score
from coordinator.envs.datasets import DatasetSource
from coordinator.envs.tasks import GeneratedTask

__all__ = ["Env", "Problem", "ProblemSource", "Score", "build_source"]


def build_source(task: str, dataset: Path | None, seed: int) -> ProblemSource:
    return DatasetSource(dataset) if dataset is not None else GeneratedTask(task, seed)
