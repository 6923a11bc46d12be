"""Megatron's 1F1B pipeline schedule: a PP=2 learner whose token budget cuts each request into M = 4
micro-batches against the same PP=2 layout taking the request whole (M = 1), on the same HF weights.

With M = 4 and two stages, stage 0 runs one warm-up forward, then alternates forward(m+1) with
backward(m), so the stages work on different micro-batches at once; M = 1 is one forward and one
backward per stage. Losses are sums over datums, so both must give the same logprobs, loss, gradient
norm and AdamW step, up to float32 rounding of differently shaped matmuls (the padded width differs).

Tolerances (fp32, CPU): logprobs atol/rtol 1e-5; loss and grad-norm rel 1e-5; weights after one AdamW
step (lr 1e-3, eps 1e-8) as test_megatron_parity's assert_weights_match (every element within 1e-4,
at most 1 in 10^4 beyond 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.backends.packing import plan_micro_batches
from protos.channels import open_channel
from tests.learner.client import random_rows
from tests.learner.megatron.needs import require_megatron
from tests.learner.megatron.test_megatron_parity import (
    ADAM,
    assert_weights_match,
    close_request,
    megatron_client,
    saved_tensors,
)
from tests.learner.test_training_math import reference_logprobs

pytestmark = pytest.mark.integration
require_megatron()

LENGTHS = (5, 9, 7, 12, 6, 10, 8, 4)
BUDGET = 20
"""Four micro-batches of two datums each (14, 19, 16 and 12 tokens)."""


def rl_rows(hf_model, seed: int) -> list[dict]:
    rows = random_rows(hf_model.config.vocab_size, lengths=LENGTHS, seed=seed, inputs=("advantages",))
    rng = np.random.default_rng(seed + 100)
    with torch.no_grad():  # sampler logprobs near the model's own, so some PPO ratios clip
        for row in rows:
            lp = reference_logprobs(hf_model, row).numpy()
            row["logprobs"] = (lp + rng.uniform(-0.6, 0.6, size=lp.shape)).astype(np.float32)
    return rows


async def one_step(learner, model_dir, rows, name: str):
    async with open_channel(learner.address) as channel:
        client = await megatron_client(channel, model_dir)
        forward_logprobs, _ = await client.forward(rows, "ppo")
        logprobs, metrics = await client.forward_backward(rows, "ppo")
        stepped = await client.optim_step(
            learning_rate=ADAM.learning_rate, weight_decay=ADAM.weight_decay, grad_clip_norm=ADAM.grad_clip_norm,
            eps=ADAM.eps,
        )  # fmt: skip
        weights = saved_tensors((await client.save_weights(name)).path)
        await client.stub.CloseSession(close_request(client))
    return forward_logprobs, logprobs, metrics, stepped, weights


@pytest.mark.parametrize("model", ["llama", "qwen2"])
async def test_four_micro_batches_through_1f1b_equal_one(megatron_learners, tiny_model_dir, qwen2_model_dir, model):
    assert len(plan_micro_batches(LENGTHS, BUDGET)) == 4
    model_dir = tiny_model_dir if model == "llama" else qwen2_model_dir  # qwen2: tied embedding over the stages
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = rl_rows(hf_model, seed=3)
    whole = await one_step(megatron_learners(1, 2, 2), model_dir, rows, f"{model}-m1")
    pieces = await one_step(megatron_learners(1, 2, 2, BUDGET), model_dir, rows, f"{model}-m4")

    for got_set, want_set in zip(pieces[:2], whole[:2], strict=True):  # forward, then forward_backward
        assert len(got_set) == len(LENGTHS)
        for got, want in zip(got_set, want_set, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for row, got in zip(rows, pieces[0], strict=True):  # and both equal transformers' own forward
            np.testing.assert_allclose(got, reference_logprobs(hf_model, row).numpy(), atol=1e-5, rtol=1e-5)
    assert (pieces[2]["learner/micro_batches:sum"], whole[2]["learner/micro_batches:sum"]) == (4, 1)
    for metrics in (pieces[2], whole[2]):  # reported like the torch backend's, into metrics.jsonl
        assert metrics["learner/tokens_per_s:mean"] > 0 and metrics["learner/peak_memory_gib:max"] > 0
    assert pieces[2]["loss:sum"] == pytest.approx(whole[2]["loss:sum"], rel=1e-5)
    assert pieces[2]["clip_fraction:mean"] == pytest.approx(whole[2]["clip_fraction:mean"], rel=1e-5, abs=1e-7)
    assert pieces[3].metrics["grad_norm:mean"] == pytest.approx(whole[3].metrics["grad_norm:mean"], rel=1e-5)
    assert_weights_match(pieces[4], whole[4])
    original = {n: p.detach() for n, p in hf_model.state_dict().items()}
    moved = max((whole[4][n] - original[n]).abs().max().item() for n in whole[4])
    assert moved > 5e-4, "the step must move the weights for the comparison to mean anything"
