"""The Megatron backend's Mixture-of-Experts extras on anvil-tiny-moe (Qwen3-MoE), against computations made
here from Hugging Face's own router logits (each datum alone, so no padding):

* per-expert load: the most and least loaded expert's real tokens over the mean (worst layer), at TP1, at PP2
  (each stage counts its own layers) and at EP2 (each replica its own tokens, before the all-to-all);
* the load-balancing loss (`backend.moe_aux_loss_coeff`): Switch Transformer's term per layer,
  coeff * E / (k * T^2) * sum_e (sum_t p_te) * n_e over the micro-batch's T real tokens, added to the
  policy loss: Megatron's gradient norm and its weights after a step equal the torch backend's with this
  term's gradient added (and differ from them without it).
"""

from __future__ import annotations

import pytest
import torch

from protos.adam import AdamParams
from protos.channels import open_channel
from tests.learner.megatron.needs import require_megatron
from tests.learner.megatron.test_megatron_parity import (
    LAYOUTS,
    assert_weights_match,
    close_request,
    megatron_client,
    rows_for,
    saved_tensors,
    torch_backend,
    torch_forward,
)

pytestmark = pytest.mark.integration
require_megatron()

AUX_COEFF = 1.0  # large, so its share of the gradient is far above the comparison's tolerance


@pytest.fixture(scope="module")
def moe(anvil_home):
    from transformers import AutoModelForCausalLM

    from coordinator.models import resolve_model

    directory = resolve_model("anvil-tiny-moe")
    return directory, AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def router_logits(model, rows) -> list[torch.Tensor]:
    """Per MoE layer, the router logits of every real token of `rows` ([T, E]), each datum alone."""
    per_datum = [
        model(input_ids=torch.as_tensor(row["model_input"], dtype=torch.long)[None], output_router_logits=True)
        for row in rows
    ]
    return [
        torch.cat([out.router_logits[layer] for out in per_datum]) for layer in range(len(per_datum[0].router_logits))
    ]


def expected_load(model, rows) -> tuple[float, float]:
    k = model.config.num_experts_per_tok
    with torch.no_grad():
        counts = [
            torch.bincount(torch.topk(logits, k).indices.reshape(-1), minlength=model.config.num_experts).double()
            for logits in router_logits(model, rows)
        ]
    return max(float(c.max() / c.mean()) for c in counts), min(float(c.min() / c.mean()) for c in counts)


@pytest.mark.parametrize("layout", ["tp1", "pp2", "ep2"])
async def test_expert_load_counts_real_tokens(megatron_learners, moe, layout):
    model_dir, hf = moe
    rows = rows_for("cross_entropy", hf, seed=3)
    most, least = expected_load(hf, rows)
    async with open_channel(megatron_learners(*LAYOUTS[layout]).address) as channel:
        client = await megatron_client(channel, model_dir)
        _, metrics = await client.forward(rows)
        await client.stub.CloseSession(close_request(client))
    assert metrics["learner/moe_load_max_over_mean:max"] == pytest.approx(most, rel=1e-9)
    assert metrics["learner/moe_load_min_over_mean:min"] == pytest.approx(least, rel=1e-9)
    assert most > 1.0 > least, "the random router is not perfectly balanced"


def switch_aux_loss(model, rows, coeff: float) -> torch.Tensor:
    """Megatron's per-micro-batch load-balancing loss, summed over layers (one micro-batch: every row)."""
    k, experts = model.config.num_experts_per_tok, model.config.num_experts
    total = torch.zeros(())
    for logits in router_logits(model, rows):
        probs = torch.softmax(logits.float(), dim=-1)
        counts = torch.bincount(torch.topk(probs, k).indices.reshape(-1), minlength=experts).float()
        tokens = logits.shape[0]
        total = total + (probs.sum(dim=0) * counts).sum() * experts * coeff / (k * tokens * tokens)
    return total


async def test_load_balancing_loss_adds_its_gradient(megatron_learners, moe):
    model_dir, hf = moe
    learner = megatron_learners(1, 1, settings=(f"backend.moe_aux_loss_coeff={AUX_COEFF}",))
    adam = AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0, eps=1e-8)
    rows = rows_for("ppo", hf, seed=0)
    with_aux, without_aux = torch_backend(model_dir), torch_backend(model_dir)
    torch_forward(with_aux, rows, "ppo", backward=True)
    switch_aux_loss(with_aux.model, rows, AUX_COEFF).backward()  # onto the policy loss's gradients
    expected = with_aux.optim_step(adam)
    torch_forward(without_aux, rows, "ppo", backward=True)
    expected_without = without_aux.optim_step(adam)
    async with open_channel(learner.address) as channel:
        client = await megatron_client(channel, model_dir)
        await client.forward_backward(rows, "ppo")
        stepped = await client.optim_step(
            learning_rate=adam.learning_rate, weight_decay=adam.weight_decay, grad_clip_norm=adam.grad_clip_norm,
            eps=adam.eps,
        )  # fmt: skip
        weights = saved_tensors((await client.save_weights("after-aux")).path)
        await client.stub.CloseSession(close_request(client))
    assert stepped.metrics["grad_norm:mean"] == pytest.approx(expected["grad_norm:mean"], rel=1e-4)
    assert stepped.metrics["grad_norm:mean"] != pytest.approx(expected_without["grad_norm:mean"], rel=1e-3)
    assert_weights_match(weights, dict(with_aux.named_weights()))
