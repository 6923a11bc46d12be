"""End to end: a Megatron learner (TP=2, two torchrun ranks) + a torch rollout + the coordinator's RL loop.

Each step samples on rollout, trains with ForwardBackward/OptimStep on the Megatron ranks, and broadcasts
the gathered weights to rollout with the stream weight-update protocol. After every step N the rollout
must serve version N, and its logprobs must equal the learner's on the same sequences (both fp32 on CPU;
atol 1e-4; measured 4.8e-7 at every step) - while the weights really move between steps.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from coordinator.client.learner_api import LearnerSession
from coordinator.config import LoopConfig
from coordinator.envs import build_source
from coordinator.envs.answer_env import AnswerEnv
from coordinator.envs.base import Score
from coordinator.fleet.replica_set import ReplicaSet
from coordinator.loop import RLLoop, StepResult
from protos.adam import AdamParams
from protos.channels import open_channel
from protos.rpc import ServerConfig
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout
from tests.learner.megatron.needs import require_megatron

require_megatron()
pytestmark = pytest.mark.integration
STEPS = 3
LOGPROB_ATOL = 1e-4


class EvenFirstTokenEnv(AnswerEnv):
    """The copy-digit prompts with a dense reward (is the first sampled token id even?): a random policy
    earns it half the time, so every group has advantages and every step moves the weights."""

    async def score(self, completion_tokens: list[int]) -> Score:
        return Score(float(bool(completion_tokens) and completion_tokens[0] % 2 == 0), {})


def probe_rows(tokenizer, source) -> list[dict]:
    """Fixed prompt + answer sequences to score on both sides after each step."""
    rows = []
    for index in range(3):
        problem = source.problem(1000 + index)
        text = f"<|user|>{problem.prompt}<|end|><|assistant|>{problem.answer}<|end|>"
        tokens = np.asarray(tokenizer.encode(text), dtype=np.int64)
        rows.append(
            {"model_input": tokens[:-1], "target_tokens": tokens[1:], "weights": np.zeros(len(tokens) - 1, np.float32)}
        )
    return rows


async def test_rl_steps_with_weight_broadcast_keep_rollout_and_learner_in_step(megatron_learners, tiny_model_dir):
    learner = megatron_learners(2, 2)
    rollout_server, _ = await start_rollout(
        RolloutConfig(
            model=tiny_model_dir, model_name="anvil-tiny", server=ServerConfig(), engine=TorchEngineConfig(device="cpu")
        )
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    source = build_source("copy_digit", None, 0)
    rows = probe_rows(tokenizer, source)
    rollout = await ReplicaSet.connect([rollout_server.address])
    checked: list[tuple[int, float, np.ndarray]] = []
    try:
        async with open_channel(learner.address) as channel:
            session = await LearnerSession.create(channel, "anvil-tiny", lora_rank=0, seed=0)

            async def compare(result: StepResult) -> None:
                assert await rollout.versions() == [result.step]
                learner_lp, _, _ = await session.forward_rows(rows, "cross_entropy", None, backward=False)
                worst = 0.0
                for row, from_learner in zip(rows, learner_lp, strict=True):
                    tokens = [*row["model_input"].tolist(), int(row["target_tokens"][-1])]
                    from_rollout = np.asarray((await rollout.compute_logprobs(tokens))[1:], dtype=np.float32)
                    worst = max(worst, float(np.abs(from_rollout - from_learner).max()))
                checked.append((result.step, worst, np.concatenate(learner_lp)))

            async def no_checkpoint(step: int, next_batch: int) -> None:
                return None

            config = LoopConfig(
                steps=STEPS, groups_per_batch=4, group_size=4, max_tokens=4, max_off_policy_steps=0,
                sampler_concurrency=4, adam=AdamParams(learning_rate=3e-3, eps=1e-8, grad_clip_norm=1.0),
            )  # fmt: skip
            loop = RLLoop(
                config=config, session=session, rollout=rollout, source=source,
                make_env=lambda problem: EvenFirstTokenEnv(problem, tokenizer), seed=0, start_batch=0,
                on_step=compare, on_checkpoint=no_checkpoint,
            )  # fmt: skip
            await loop.run()
            await session.close()
    finally:
        await rollout.close()
        await rollout_server.stop(0)
    assert [step for step, _, _ in checked] == list(range(1, STEPS + 1))
    assert all(worst <= LOGPROB_ATOL for _, worst, _ in checked), [(s, w) for s, w, _ in checked]
    first, last = checked[0][2], checked[-1][2]
    assert np.abs(last - first).max() > 1e-3, "the weights must move, or the parity says nothing"
