"""The supervised warmup (coordinator/warmup.py) on a real learner: each step's reported loss is the mean
negative log-likelihood of the answer tokens (EOS included) that a transformers forward pass of the same
weights computes, prompt tokens carry no loss, the learner's step advances, and the loss falls."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.client.learner_api import LearnerSession
from coordinator.config import WarmupConfig
from coordinator.envs.answer_env import AnswerEnv
from coordinator.envs.tasks import GeneratedTask
from coordinator.warmup import WARMUP_FILE, problems, supervised_warmup
from protos.adam import AdamParams
from protos.channels import open_channel


def answer_nll(model, tokenizer, envs: list[AnswerEnv], prompts: list[list[int]]) -> float:
    """Mean NLL of each env's answer tokens and EOS after its prompt: transformers, one sequence at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for env, prompt in zip(envs, prompts, strict=True):
            completion = env.reference_completion()
            tokens = torch.tensor([[*prompt, *completion]])
            logprobs = torch.log_softmax(model(tokens).logits[0, :-1].double(), dim=-1)
            targets = tokens[0, 1:]
            picked = logprobs[torch.arange(len(targets)), targets][len(prompt) - 1 :]
            total -= float(picked.sum())
            count += len(completion)
    return total / count


async def test_warmup_trains_the_answers_and_reports_their_mean_nll(learner, tiny_model_dir, tmp_path):
    _, address = learner
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    source = GeneratedTask("reverse", seed=1)
    config = WarmupConfig(steps=12, batch_size=8, learning_rate=3e-3)

    def make_env(problem):
        return AnswerEnv(problem, tokenizer)

    first_envs = [make_env(problem) for problem in problems(source, 0, config.batch_size)]
    assert tokenizer.decode(first_envs[0].reference_completion()[-1:]) == tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    expected_first = answer_nll(base, tokenizer, first_envs, [await env.prompt_tokens() for env in first_envs])

    async with open_channel(address) as channel:
        session = await LearnerSession.create(channel, "anvil-tiny", seed=0)
        step = await supervised_warmup(config, session, source, make_env, AdamParams(), tmp_path, Console(quiet=True))
        assert step == config.steps == session.info.step
        assert (await session.get_info()).step == config.steps

    rows = [json.loads(line) for line in (tmp_path / WARMUP_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, config.steps + 1))
    assert rows[0]["loss/mean_nll"] == pytest.approx(expected_first, rel=1e-4)
    assert rows[-1]["loss/mean_nll"] < 0.7 * rows[0]["loss/mean_nll"]


def test_problems_wrap_around_a_finite_source(tmp_path):
    from coordinator.envs.datasets import DatasetSource

    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": f"a{i}"}) + "\n" for i in range(3)))
    picked = problems(DatasetSource(path), 2, 4)
    assert [p.prompt for p in picked] == ["p2", "p0", "p1", "p2"]
