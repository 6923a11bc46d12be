"""Learner and rollout servers on their own event-loop threads, so synchronous client code can call
them from the test thread while the test still reaches into the learner's tensors."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from learner.config import LearnerConfig
from learner.server import start_learner
from protos.rpc import ServerConfig
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout


class ThreadedServers:
    """Runs servers on a private loop in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running = []

    def start(self, coroutine):
        running, servicer = asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(120)
        self.running.append(running)
        return running.address, servicer

    def close(self) -> None:
        for running in self.running:
            asyncio.run_coroutine_threadsafe(running.stop(0), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def servers(tiny_model_dir: Path, tmp_path_factory) -> Iterator[dict]:
    threaded = ThreadedServers()
    learner_config = LearnerConfig(
        server=ServerConfig(api_key="client-test-key"),
        checkpoint_dir=tmp_path_factory.mktemp("client-checkpoints"),
        max_sessions=8,
        models={"anvil-tiny": tiny_model_dir},
    )
    learner_address, learner = threaded.start(start_learner(learner_config))
    rollout_config = RolloutConfig(
        model=tiny_model_dir, model_name="anvil-tiny", server=ServerConfig(api_key="client-test-key"),
        engine=TorchEngineConfig(device="cpu"),
    )  # fmt: skip
    rollout_address, _ = threaded.start(start_rollout(rollout_config))
    yield {"learner": learner, "learner_address": learner_address, "rollout_address": rollout_address}
    threaded.close()


def wait(condition: Callable[[], object], what: str, timeout_s: float = 120) -> None:
    """Poll `condition` every 0.5 s until it is true; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")
