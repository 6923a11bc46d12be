"""A real learner gRPC server on loopback (in-process, so tests can inspect the backend's tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner.config import LearnerConfig
from learner.server import start_learner
from protos.rpc import ServerConfig, open_channel
from tests.learner.client import LearnerTestClient


@pytest.fixture
def learner_config(tmp_path: Path, tiny_model_dir: Path) -> LearnerConfig:
    return LearnerConfig(
        server=ServerConfig(),
        checkpoint_dir=tmp_path / "checkpoints",
        max_sessions=4,
        sequence_gap_timeout_s=5.0,
        models={"anvil-tiny": tiny_model_dir},
    )


@pytest.fixture
async def learner(learner_config: LearnerConfig):
    """(servicer, address) of a running learner; stopped after the test."""
    running, servicer = await start_learner(learner_config)
    yield servicer, running.address
    await running.stop(0)


@pytest.fixture
async def client(learner):
    """A client with a fresh anvil-tiny session on the running learner."""
    servicer, address = learner
    async with open_channel(address) as channel:
        created = await LearnerTestClient.create(channel, servicer)
        yield created
