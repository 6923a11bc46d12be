"""Shared fixtures: an isolated ANVIL_HOME, the built-in tiny model, and GPU marker handling.

No test downloads anything: HF_HUB_OFFLINE is forced on, and the built-in models are made in code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from learner.config import LearnerConfig
from protos.rpc import ServerConfig

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# anvil serve puts its tokenizer in the hub cache (coordinator/tokenizer_cache.py): a cache of the tests' own
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="anvil-tests-hf-hub-")


@pytest.fixture(scope="session", autouse=True)
def anvil_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ANVIL_HOME at a per-session temp dir so tests never touch (or depend on) ~/.cache/anvil."""
    home = tmp_path_factory.mktemp("anvil-home")
    previous = os.environ.get("ANVIL_HOME")
    os.environ["ANVIL_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("ANVIL_HOME", None)
    else:
        os.environ["ANVIL_HOME"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(anvil_home: Path) -> Path:
    """The anvil-tiny Hugging Face directory, built once per test session."""
    from coordinator.models import resolve_model

    return resolve_model("anvil-tiny")


# --- a real learner on loopback (in-process, so tests can inspect the backend's tensors) -----------


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
    from learner.server import start_learner

    running, servicer = await start_learner(learner_config)
    yield servicer, running.address
    await running.stop(0)


@pytest.fixture
async def client(learner):
    """A client with a fresh anvil-tiny session on the running learner."""
    from protos.channels import open_channel
    from tests.learner.client import LearnerTestClient

    servicer, address = learner
    async with open_channel(address) as channel:
        created = await LearnerTestClient.create(channel, servicer)
        yield created


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA, unless ANVIL_EXPECT_GPU=1 promises one (then they must run)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("ANVIL_EXPECT_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
