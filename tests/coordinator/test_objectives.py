"""RL objectives against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import SampledSequence
from coordinator.config import RunConfig
from coordinator.envs.base import Problem
from coordinator.objectives import ScoredGroup, make_objective
from coordinator.objectives.custom import CustomConfig
from coordinator.objectives.dpo import DPO
from coordinator.objectives.maths import (
    batch_advantages,
    dpo_loss,
    group_advantages,
    loss_scales,
    policy_datum,
    sampler_learner_kl,
    truncated_is_weights,
)
from coordinator.objectives.policy_gradient import PolicyGradient, PolicyGradientConfig
from protos.channels import open_channel
from protos.errors import InvalidArgument
from servicekit.config import load_config


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


def scored_groups() -> list[ScoredGroup]:
    """Two groups of fabricated samples (tokens, sampler logprobs, rewards), as the loop would score them."""
    problem = Problem(index=0, prompt="", answer="")
    prompt = [4, 295, 289, 226]
    sequences = [
        [SampledSequence("stop", [30, 31, 2], [-1.2, -0.4, -2.0]), SampledSequence("length", [40, 41], [-0.3, -0.9])],
        [SampledSequence("stop", [50, 2], [-0.7, -1.1]), SampledSequence("stop", [60, 61, 62], [-2.2, -0.1, -0.5])],
    ]
    rewards = [[1.0, 0.0], [0.25, 1.0]]
    return [
        ScoredGroup(0, problem, prompt, seqs, rs, [1.0, 0.0], sampler_version=0, sample_s=0.0)
        for seqs, rs in zip(sequences, rewards, strict=True)
    ]


def test_objective_configs_are_one_union_keyed_on_type():
    config = load_config(RunConfig, None, ['loop.objective={type="cispo", loss_config={clip_high_threshold=1.2}}'])
    assert isinstance(make_objective(config.loop.objective), PolicyGradient)
    assert config.loop.objective.loss_config == {"clip_high_threshold": 1.2}
    dpo = load_config(RunConfig, None, ['loop.objective={type="dpo", beta=0.3}']).loop.objective
    assert isinstance(make_objective(dpo), DPO) and dpo.beta == 0.3
    with pytest.raises(InvalidArgument, match=r"dpo\.tis_cap"):  # a DPO objective takes no policy-gradient keys
        load_config(RunConfig, None, ['loop.objective={type="dpo", tis_cap=2.0}'])
    with pytest.raises(InvalidArgument, match="cannot be loaded"):
        make_objective(CustomConfig(loss="no.such.module:loss"))


async def test_a_custom_torch_loss_trains_exactly_like_the_built_in_it_rewrites(servers):
    """The custom objective (client-side two-pass) with importance_sampling written in torch gives the same
    loss and learner gradients as the built-in importance_sampling objective on the same groups."""
    learner = servers["learner"]
    gradients, losses = [], []
    async with open_channel(servers["learner_address"], api_key="client-test-key") as channel:
        for objective in (
            make_objective(PolicyGradientConfig(type="importance_sampling")),
            make_objective(CustomConfig(loss="coordinator.objectives.custom_losses:importance_sampling")),
        ):
            session = await LearnerSession.create(channel, "anvil-tiny", seed=0)
            metrics: dict[str, float] = {}
            learner_T = await objective.accumulate_gradients(session, scored_groups(), metrics)
            assert learner_T is not None and learner_T.size == 10  # every completion token, in group order
            model = learner.sessions.get(session.session_id).backend.model
            gradients.append({name: p.grad.clone() for name, p in model.named_parameters()})
            losses.append(metrics["loss/sum"])
            await session.close()
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in gradients[0].values())
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, rtol=1e-4, atol=1e-7, msg=name)


def test_loss_scales_turn_the_sum_into_each_normalisation():
    lengths, terms = [3, 1, 4], [np.array([0.5, -1.0, 2.0]), np.array([3.0]), np.array([1.0, 1.0, -2.0, 0.5])]

    def scaled_sum(normalization: str) -> float:
        scales = loss_scales(lengths, normalization, constant_tokens=8)
        return float(sum(scale * t.sum() for scale, t in zip(scales, terms, strict=True)))

    assert scaled_sum("sum") == pytest.approx(sum(t.sum() for t in terms))
    assert scaled_sum("token_mean") == pytest.approx(np.concatenate(terms).mean())
    assert scaled_sum("sequence_mean") == pytest.approx(np.mean([t.mean() for t in terms]))
    assert scaled_sum("constant") == pytest.approx(sum(t.sum() for t in terms) / (8 * 3))
    with pytest.raises(ValueError, match="constant_tokens"):
        loss_scales(lengths, "constant")
    config = load_config(
        RunConfig, None, ['loop.objective={type="ppo", loss_normalization="constant"}', "loop.max_tokens=16"]
    )
    assert config.loop.objective.constant_tokens == 16, "Dr. GRPO's constant defaults to the generation budget"


async def test_each_loss_normalisation_is_the_learners_loss(servers, tiny_model_dir):
    """importance_sampling through the real learner under each normalisation equals the normalised loss
    computed here from a transformers forward pass: -exp(lp - lp_sampler) * A per token, then summed,
    token-mean, sequence-mean or divided by constant_tokens x sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    groups = scored_groups()
    terms = []
    for group in groups:
        for sequence, advantage in zip(group.sequences, group_advantages(group.rewards, True), strict=True):
            tokens = [*group.prompt, *sequence.tokens]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([tokens[:-1]])).logits[0].float(), -1)
            lp = logprobs[len(group.prompt) - 1 :].gather(1, torch.tensor(sequence.tokens)[:, None])[:, 0].numpy()
            terms.append(-np.exp(lp - np.asarray(sequence.logprobs)) * advantage)
    expected = {
        "sum": sum(t.sum() for t in terms),
        "token_mean": np.concatenate(terms).mean(),
        "sequence_mean": np.mean([t.mean() for t in terms]),
        "constant": sum(t.sum() for t in terms) / (5 * len(terms)),
    }
    async with open_channel(servers["learner_address"], api_key="client-test-key") as channel:
        for normalization, want in expected.items():
            config = PolicyGradientConfig(
                type="importance_sampling", loss_normalization=normalization, constant_tokens=5
            )
            session = await LearnerSession.create(channel, "anvil-tiny", seed=0)
            metrics: dict[str, float] = {}
            await make_objective(config).accumulate_gradients(session, groups, metrics)
            await session.close()
            assert metrics["loss/sum"] == pytest.approx(want, rel=1e-4), normalization


@pytest.mark.parametrize("normalization", ["sum", "token_mean", "sequence_mean", "constant"])
async def test_a_batch_trained_in_passes_has_the_whole_batchs_gradient(servers, normalization):
    """The loop's streamed step (coordinator.loop, `groups_per_pass`): one pass per group, each leaving
    out the factor the whole batch shares, which OptimStep applies as grad_scale before clipping
    (tests/learner/test_training_math.py checks grad_scale). The passes' gradient times that factor must
    be the gradient of one pass on the whole batch with the factor in the advantages, and the merged
    loss the whole batch's."""
    from coordinator.step_inputs import merge_pass_metrics

    learner, groups = servers["learner"], scored_groups()
    config = PolicyGradientConfig(type="ppo", loss_normalization=normalization, constant_tokens=5)
    gradients, losses = [], []
    async with open_channel(servers["learner_address"], api_key="client-test-key") as channel:
        for streamed in (False, True):
            objective = make_objective(config)
            assert objective.streams
            session = await LearnerSession.create(channel, "anvil-tiny", seed=0)
            scale = 1.0
            if streamed:
                passes = []
                for group in groups:
                    passes.append({})
                    await objective.accumulate_part(session, [group], passes[-1])
                scale = objective.batch_grad_scale(groups)
                losses.append(merge_pass_metrics(passes, scale)["loss/sum"])
                assert merge_pass_metrics(passes, scale)["train/passes"] == len(groups)
            else:
                metrics: dict[str, float] = {}
                await objective.accumulate_gradients(session, groups, metrics)
                losses.append(metrics["loss/sum"])
            model = learner.sessions.get(session.session_id).backend.model
            gradients.append({name: p.grad * scale for name, p in model.named_parameters()})
            await session.close()
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert any(g.abs().sum() > 0 for g in gradients[0].values())
    for name, expected in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], expected, rtol=1e-4, atol=1e-8, msg=name)


def test_only_objectives_whose_groups_stand_alone_stream():
    assert make_objective(PolicyGradientConfig(type="ppo")).streams
    assert not make_objective(PolicyGradientConfig(type="ppo", advantage_baseline="batch")).streams
    assert not make_objective(load_config(RunConfig, None, ['loop.objective={type="dpo"}']).loop.objective).streams
