"""Megatron learners as real torchrun process groups (gloo, CPU, fp32) on loopback, and a Qwen2 model.

Each layout (tp, world size) is one `scripts/megatron_learner.sh` (torchrun --standalone of
`python -m learner` with the megatron backend), started on first use and shared by this test package.
It is stopped with SIGTERM to its process group (SIGKILL after a grace period), so no rank outlives
the tests. OMP_NUM_THREADS=1: the CI machine has two cores for two ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
STARTUP_TIMEOUT_S = 240


class MegatronLearner:
    """One torchrun'd learner; `address` is rank 0's gRPC endpoint."""

    def __init__(
        self,
        tp: int,
        pp: int,
        world: int,
        model_dir: Path,
        checkpoint_dir: Path,
        log_path: Path,
        micro_batch_tokens: int | None = None,
        activation_checkpointing: bool = False,
        ep: int = 1,
        settings: tuple[str, ...] = (),
    ) -> None:
        command = [  # the one-node launcher users run; it derives the rank count (tp * pp * dp) from the config
            "bash", "scripts/megatron_learner.sh",
            "--set", "server.port=0",
            "--set", f"backend.tp={tp}",
            "--set", f"backend.pp={pp}",
            "--set", f"backend.dp={world // (tp * pp)}",
            "--set", f"backend.ep={ep}",
            "--set", "backend.collective_timeout_s=120",
            "--set", "max_sessions=8",
            "--set", f'checkpoint_dir="{checkpoint_dir}"',
            "--set", f'models.anvil-tiny="{model_dir}"',
        ]  # fmt: skip
        if micro_batch_tokens is not None:
            command += ["--set", f"backend.max_tokens_per_micro_batch={micro_batch_tokens}"]
        if activation_checkpointing:
            command += ["--set", "backend.activation_checkpointing=true"]
        for setting in settings:
            command += ["--set", setting]
        env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log_path = log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.address = self._wait_listening()

    def _wait_listening(self) -> str:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("LISTENING "):
                    return line.split()[1]
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"megatron learner did not start; log:\n{self.log_path.read_text()[-4000:]}")

    def signal_stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal_stop()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="package")  # stopped when this directory's tests are done, not at the end of the run
def megatron_learners(tiny_model_dir: Path, tmp_path_factory) -> Iterator:
    """get(tp, world, pp=1, micro_batch_tokens=None, activation_checkpointing=False, ep=1, settings=()) -> a
    running MegatronLearner of that layout, with those extra `--set` settings (started once per test package)."""
    from tests.learner.megatron.needs import require_megatron

    require_megatron()
    started: dict[tuple, MegatronLearner] = {}
    root = tmp_path_factory.mktemp("megatron")

    def get(
        tp: int, world: int, pp: int = 1, micro_batch_tokens: int | None = None, activation_checkpointing: bool = False,
        ep: int = 1, settings: tuple[str, ...] = (),
    ) -> MegatronLearner:  # fmt: skip
        key = (tp, pp, world, micro_batch_tokens, activation_checkpointing, ep, settings)
        if key not in started:
            name = f"tp{tp}-pp{pp}-w{world}-mb{micro_batch_tokens}-ep{ep}-{len(started)}"
            started[key] = MegatronLearner(
                tp, pp, world, tiny_model_dir, root / name, root / f"{name}.log", micro_batch_tokens,
                activation_checkpointing, ep, settings,
            )  # fmt: skip
        return started[key]

    yield get
    for learner in started.values():  # all at once: each takes a few seconds to wind down
        learner.signal_stop()
    for learner in started.values():
        learner.stop()


@pytest.fixture(scope="session")
def qwen2_model_dir(tmp_path_factory) -> Path:
    """A random Qwen2 (tied embeddings, qkv bias, GQA, vocab 300: padded to 384 in Megatron), no download."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # larger than the init's std 0.02, so logits and their gradients are not tiny
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    directory = tmp_path_factory.mktemp("qwen2-tiny")
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def deepseek_model_dir(anvil_home, tmp_path_factory) -> Path:
    """anvil-tiny-deepseek (MLA, a dense first layer, then 8 routed experts in 2 groups beside a shared one)
    with every weight moved off its small initialisation and a random router expert bias, large enough to
    change which experts (and groups) the sigmoid router picks: the built-in's bias is all zeros."""
    import torch
    from transformers import AutoModelForCausalLM

    from coordinator.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("anvil-tiny-deepseek"), dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    directory = tmp_path_factory.mktemp("deepseek-tiny")
    model.save_pretrained(directory)
    return directory
