"""The learner's maths against independent computations: losses vs torch.autograd on an unpadded
per-datum forward of a separate copy of the model, the two-pass custom loss, accumulation, AdamW."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.learner.client import random_rows

# float32 throughout; the server pads and batches, the reference runs each datum alone.
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-5}
LOGPROB_TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def reference_model(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.eval()


def reference_logprobs(model, row) -> torch.Tensor:
    """log p(target | prefix) for one datum, by a direct log-softmax and index (K targets per position)."""
    input_ids = torch.as_tensor(np.asarray(row["model_input"]), dtype=torch.long)[None]
    logprobs_NV = torch.log_softmax(model(input_ids=input_ids).logits[0], dim=-1)
    n = input_ids.shape[1]
    targets = np.asarray(row["target_tokens"]).reshape(n, -1)
    return torch.stack([logprobs_NV[i, int(t)] for i in range(n) for t in targets[i]])


def reference_loss(name: str, lp: torch.Tensor, row, config) -> torch.Tensor:
    if name == "cross_entropy":
        return -(torch.as_tensor(row["weights"]) * lp).sum()
    sampler = torch.as_tensor(row["logprobs"])
    advantages = torch.as_tensor(row["advantages"])
    ratio = torch.exp(lp - sampler)
    if name == "importance_sampling":
        return -(ratio * advantages).sum()
    if name == "ppo":
        low, high = config.get("clip_low_threshold", 0.8), config.get("clip_high_threshold", 1.2)
        return -torch.min(ratio * advantages, torch.clamp(ratio, low, high) * advantages).sum()
    if name == "cispo":
        low, high = config.get("clip_low_threshold", 0.0), config.get("clip_high_threshold", 4.0)
        coefficient = torch.clamp(ratio.detach(), low, high)  # a constant: stop-gradient
        return -(coefficient * lp * advantages).sum()
    if name == "dro":
        beta = config.get("beta", 0.05)
        return -(lp * advantages - 0.5 * beta * (lp - sampler) ** 2).sum()
    if name == "gspo":  # the GSPO paper's sequence ratio: a length-normalised product of token ratios
        low, high = config.get("clip_low_threshold", 1 - 3e-4), config.get("clip_high_threshold", 1 + 4e-4)
        mask = (
            torch.as_tensor(row["sequence_ratio_mask"]) if "sequence_ratio_mask" in row else (advantages != 0).float()
        )
        sequence_ratio = torch.exp(((lp - sampler) * mask).sum() / mask.sum().clamp(min=1))
        objective = torch.min(sequence_ratio * advantages, torch.clamp(sequence_ratio, low, high) * advantages)
        return -(mask * objective).sum()
    raise AssertionError(name)


def rl_rows(model, vocab_size, seed=0):
    """Rows whose sampler logprobs sit near the model's own, so some ratios clip and some do not."""
    rows = random_rows(vocab_size, seed=seed, inputs=("advantages",))
    rng = np.random.default_rng(seed + 1)
    with torch.no_grad():
        for row in rows:
            lp = reference_logprobs(model, row).numpy()
            row["logprobs"] = (lp + rng.uniform(-0.6, 0.6, size=lp.shape)).astype(np.float32)
    return rows


def assert_gradients_match(client, reference_model):
    server = client.gradients()
    for name, parameter in reference_model.named_parameters():
        assert server[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(server[name], parameter.grad, **GRAD_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize(
    ("loss_fn", "config"),
    [
        ("cross_entropy", {}),
        ("importance_sampling", {}),
        ("ppo", {}),
        ("ppo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}),
        ("cispo", {}),
        ("cispo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
        ("dro", {"beta": 0.3}),
        ("gspo", {}),
        ("gspo", {"clip_low_threshold": 0.9, "clip_high_threshold": 1.1}),
    ],
)
async def test_loss_gradient_and_logprobs_match_autograd(client, reference_model, loss_fn, config):
    vocab = client.backend.description.vocab_size
    rows = random_rows(vocab) if loss_fn == "cross_entropy" else rl_rows(reference_model, vocab)
    logprobs, metrics = await client.forward_backward(rows, loss_fn, config)

    total = torch.zeros(())
    for row, server_lp in zip(rows, logprobs, strict=True):
        lp = reference_logprobs(reference_model, row)
        torch.testing.assert_close(torch.from_numpy(server_lp), lp.detach(), **LOGPROB_TOL)
        total = total + reference_loss(loss_fn, lp, row, config)
    total.backward()
    assert metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-4, abs=1e-4)
    assert_gradients_match(client, reference_model)


async def test_gspo_with_a_sequence_ratio_mask_matches_autograd(client, reference_model):
    """Only masked tokens form the sequence ratio and carry loss; advantage on a prompt token is ignored."""
    vocab = client.backend.description.vocab_size
    rows = rl_rows(reference_model, vocab, seed=3)
    for row in rows:
        n = len(row["model_input"])
        row["sequence_ratio_mask"] = (np.arange(n) >= n // 2).astype(np.float32)
        row["advantages"] = np.full(n, row["advantages"][0] or 0.5, dtype=np.float32)
    config = {"clip_low_threshold": 0.95, "clip_high_threshold": 1.02}
    _, metrics = await client.forward_backward(rows, "gspo", config)
    total = sum(reference_loss("gspo", reference_logprobs(reference_model, row), row, config) for row in rows)
    total.backward()
    assert metrics["loss:sum"] == pytest.approx(total.item(), rel=1e-4, abs=1e-4)
    assert_gradients_match(client, reference_model)


async def test_ppo_clipping_is_exercised(client, reference_model):
    rows = rl_rows(reference_model, client.backend.description.vocab_size)
    _, metrics = await client.forward_backward(rows, "ppo")
    assert 0.0 < metrics["clip_fraction:mean"] < 1.0


async def test_cross_entropy_with_k_targets_and_negative_weights(client, reference_model):
    vocab = client.backend.description.vocab_size
    rng = np.random.default_rng(3)
    rows = []
    for n, k in [(4, 3), (6, 3)]:
        rows.append(
            {
                "model_input": rng.integers(0, vocab, n),
                "target_tokens": rng.integers(0, vocab, n * k),
                "weights": rng.normal(size=n * k).astype(np.float32),  # both signs
                "targets_per_position": k,
            }
        )
    logprobs, _ = await client.forward_backward(rows, "cross_entropy")
    total = torch.zeros(())
    for row, server_lp in zip(rows, logprobs, strict=True):
        lp = reference_logprobs(reference_model, row)
        assert server_lp.shape == (len(row["target_tokens"]),)
        torch.testing.assert_close(torch.from_numpy(server_lp), lp.detach(), **LOGPROB_TOL)
        total = total + reference_loss("cross_entropy", lp, row, {})
    total.backward()
    assert_gradients_match(client, reference_model)


async def test_forward_never_touches_gradients(client):
    rows = random_rows(client.backend.description.vocab_size)
    forward_lp, _ = await client.forward(rows)
    assert all(g is None for g in client.gradients().values())
    backward_lp, _ = await client.forward_backward(rows)
    after_one = client.gradients()
    await client.forward(rows)
    for name, grad in client.gradients().items():
        torch.testing.assert_close(grad, after_one[name], rtol=0, atol=0)
    for a, b in zip(forward_lp, backward_lp, strict=True):
        np.testing.assert_array_equal(a, b)


async def test_custom_loss_two_pass_dpo_matches_autograd(client, reference_model):
    """forward -> DPO in torch on the logprobs -> cross_entropy with weights = -dLoss/dlogprobs."""
    vocab = client.backend.description.vocab_size
    rows = random_rows(vocab, lengths=(8, 8), seed=11)
    for row in rows:
        row["weights"] = np.ones(len(row["target_tokens"]), dtype=np.float32)
    reference_lp_chosen, reference_lp_rejected, beta = -40.0, -38.0, 0.1

    def dpo(chosen_lp, rejected_lp):
        margin = beta * ((chosen_lp.sum() - reference_lp_chosen) - (rejected_lp.sum() - reference_lp_rejected))
        return -torch.nn.functional.logsigmoid(margin)

    # Pass 1: forward (no gradients), then the user's loss on leaf tensors.
    logprobs, _ = await client.forward([{**r, "weights": np.zeros_like(r["weights"])} for r in rows])
    leaves = [torch.tensor(lp, requires_grad=True) for lp in logprobs]
    custom_loss = dpo(*leaves)
    custom_loss.backward()
    # Pass 2: cross_entropy with weights = -dLoss/dlogprobs has the same parameter gradient.
    surrogate_rows = [{**r, "weights": (-leaf.grad).numpy()} for r, leaf in zip(rows, leaves, strict=True)]
    await client.forward_backward(surrogate_rows, "cross_entropy")

    reference = dpo(*(reference_logprobs(reference_model, r) for r in rows))
    reference.backward()
    assert custom_loss.item() == pytest.approx(reference.item(), rel=1e-5)
    assert_gradients_match(client, reference_model)


async def test_two_accumulated_calls_equal_one_concatenated_call(learner):
    from protos.channels import open_channel
    from tests.learner.client import LearnerTestClient

    servicer, address = learner
    async with open_channel(address) as channel:
        split = await LearnerTestClient.create(channel, servicer)
        joined = await LearnerTestClient.create(channel, servicer)
        vocab = split.backend.description.vocab_size
        first, second = random_rows(vocab, seed=1), random_rows(vocab, lengths=(6, 3), seed=2)
        await split.forward_backward(first)
        await split.forward_backward(second)
        await joined.forward_backward(first + second)
        joined_grads = joined.gradients()
        for name, grad in split.gradients().items():
            torch.testing.assert_close(grad, joined_grads[name], **GRAD_TOL, msg=name)
        await split.optim_step(learning_rate=1e-3)
        await joined.optim_step(learning_rate=1e-3)
        joined_params = joined.parameters_snapshot()
        for name, parameter in split.parameters_snapshot().items():
            torch.testing.assert_close(parameter, joined_params[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("grad_scale", [None, 0.05])
async def test_adamw_steps_match_torch_adamw(client, reference_model, grad_scale):
    """Three steps with clipping and weight decay equal torch.optim.AdamW stepping a copy of the model
    on the same gradients (the gradients themselves are checked against autograd above); a grad_scale
    multiplies the gradients before clipping (a loss-token normalisation)."""
    adam = {"learning_rate": 3e-3, "beta1": 0.8, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.1, "grad_clip_norm": 0.5}
    reference = copy.deepcopy(reference_model)
    optimizer = torch.optim.AdamW(
        reference.parameters(),
        lr=adam["learning_rate"],
        betas=(adam["beta1"], adam["beta2"]),
        eps=adam["eps"],
        weight_decay=adam["weight_decay"],
    )
    vocab = client.backend.description.vocab_size
    for step in range(3):
        rows = random_rows(vocab, seed=20 + step)
        await client.forward_backward(rows)
        server_grads = client.gradients()
        reply = await client.optim_step(grad_scale=grad_scale, **adam)
        assert reply.step == step + 1

        for name, parameter in reference.named_parameters():
            parameter.grad = server_grads[name] * (grad_scale or 1.0)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()]))
        assert reply.metrics["grad_norm:mean"] == pytest.approx(norm.item(), rel=1e-5)
        assert norm.item() > adam["grad_clip_norm"], "the test must exercise clipping"
        torch.nn.utils.clip_grad_norm_(reference.parameters(), adam["grad_clip_norm"])
        optimizer.step()

        server = client.parameters_snapshot()
        for name, parameter in reference.named_parameters():
            torch.testing.assert_close(server[name], parameter.detach(), rtol=1e-6, atol=1e-8, msg=name)
    assert all(g is None for g in client.gradients().values()), "optim_step must zero the gradients"
