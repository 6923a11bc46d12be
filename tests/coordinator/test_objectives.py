"""RL objectives against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.objectives import (
    batch_advantages,
    dpo_loss,
    group_advantages,
    policy_datum,
    sampler_learner_kl,
    truncated_is_weights,
)


def test_group_advantages_centre_and_scale():
    rewards = [1.0, 0.0, 0.0, 0.5]
    mean = sum(rewards) / 4
    std = (sum((r - mean) ** 2 for r in rewards) / 4) ** 0.5
    assert group_advantages(rewards, normalize_by_std=False) == pytest.approx([r - mean for r in rewards])
    assert group_advantages(rewards, normalize_by_std=True) == pytest.approx([(r - mean) / std for r in rewards])
    assert group_advantages([0.3, 0.3, 0.3], normalize_by_std=True) == [0.0, 0.0, 0.0]


def test_batch_baseline_gives_an_all_wrong_group_a_negative_advantage():
    rewards = [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    flat = [r for g in rewards for r in g]
    mean = sum(flat) / len(flat)
    assert batch_advantages(rewards, normalize_by_std=False) == [[r - mean for r in g] for g in rewards]
    normalized = batch_advantages(rewards, normalize_by_std=True)
    std = (sum((r - mean) ** 2 for r in flat) / len(flat)) ** 0.5
    assert normalized[0] == pytest.approx([-mean / std, -mean / std])
    assert group_advantages(rewards[0], normalize_by_std=True) == [0.0, 0.0], "GRPO has no signal there"


def test_policy_datum_aligns_completion_with_targets():
    prompt, completion = [10, 11, 12], [20, 21]
    datum = policy_datum(prompt, completion, [-0.5, -1.5], 2.0)
    assert datum.model_input.to_ints() == [10, 11, 12, 20]
    inputs = {k: v.to_numpy() for k, v in datum.loss_fn_inputs.items()}
    np.testing.assert_array_equal(inputs["target_tokens"], [11, 12, 20, 21])
    np.testing.assert_array_equal(inputs["logprobs"], [0, 0, -0.5, -1.5])
    np.testing.assert_array_equal(inputs["advantages"], [0, 0, 2.0, 2.0])
    per_token = policy_datum(prompt, completion, [-0.5, -1.5], [1.0, 3.0])
    np.testing.assert_array_equal(per_token.loss_fn_inputs["advantages"].to_numpy(), [0, 0, 1.0, 3.0])


def test_truncated_is_weights_and_kl():
    learner, sampler = np.log([0.5, 0.2, 0.9]), np.log([0.25, 0.4, 0.1])
    np.testing.assert_allclose(truncated_is_weights(learner, sampler, cap=2.0), [2.0, 0.5, 2.0])
    v1, v2 = sampler_learner_kl(sampler, learner)
    diff = sampler - learner
    assert v1 == pytest.approx(diff.mean()) and v2 == pytest.approx(0.5 * (diff**2).mean())


def test_dpo_loss_matches_the_formula_and_its_gradient():
    chosen = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    rejected = torch.tensor([-0.2, -3.0], requires_grad=True)
    loss_fn = dpo_loss(completion_lengths=[2, 1], reference_logprob_sums=[-3.0, -2.5], beta=0.3)
    loss, metrics = loss_fn([], [chosen, rejected])
    margin = 0.3 * ((-2.5 - -3.0) - (-3.0 - -2.5))
    assert loss.item() == pytest.approx(-np.log(1 / (1 + np.exp(-margin))), rel=1e-6)
    assert metrics["dpo_accuracy:mean"] == 1.0
    loss.backward()
    sigmoid = 1 / (1 + np.exp(-margin))
    expected = -(1 - sigmoid) * 0.3
    np.testing.assert_allclose(chosen.grad.numpy(), [0.0, expected, expected], rtol=1e-5)
    np.testing.assert_allclose(rejected.grad.numpy(), [0.0, -expected], rtol=1e-5)
