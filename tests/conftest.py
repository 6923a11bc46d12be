"""Shared fixtures: an isolated ANVIL_HOME, the built-in tiny model, and GPU marker handling.

No test downloads anything: HF_HUB_OFFLINE is forced on, and the built-in models are made in code.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA, unless ANVIL_EXPECT_GPU=1 promises one (then they must run)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("ANVIL_EXPECT_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
