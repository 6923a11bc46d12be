"""The Megatron backend's Mixture-of-Experts extras on anvil-tiny-moe (Qwen3-MoE) and a DeepSeek-V3 (conftest's
deepseek_model_dir), against computations made here from Hugging Face's own routers (each datum alone, so
no padding):

* per-expert load: the most and least loaded expert's real tokens over the mean (worst layer), at TP1, at PP2
  (each stage counts its own layers) and at EP2 (each replica its own tokens, before the all-to-all);
* routing replay: logprobs with routes a perturbed router recorded equal the torch backend's replay at TP1,
  PP2, EP2 and TP2 x EP2 (sequence parallel), and differ from free routing; one replayed step;
* the load-balancing loss (`backend.moe_aux_loss_coeff`): Switch Transformer's term per layer,
  coeff * E / (k * T^2) * sum_e (sum_t p_te) * n_e over the micro-batch's T real tokens, added to the
  policy loss: Megatron's gradient norm and its weights after a step equal the torch backend's with this
  term's gradient added (and differ from them without it).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from protos.adam import AdamParams
from protos.channels import open_channel
from protos.moe_routing import moe_routers, recording
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

ADAM = AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0, eps=1e-8)
AUX_COEFF = 1.0  # large, so its share of the gradient is far above the comparison's tolerance


@pytest.fixture(scope="module")
def moe(anvil_home):
    from transformers import AutoModelForCausalLM

    from coordinator.models import resolve_model

    directory = resolve_model("anvil-tiny-moe")
    return directory, AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def deepseek(deepseek_model_dir):
    """DeepSeek-V3 (conftest): a dense first layer, then MoE layers with a sigmoid router, bias and groups."""
    from transformers import AutoModelForCausalLM

    return deepseek_model_dir, AutoModelForCausalLM.from_pretrained(deepseek_model_dir, dtype=torch.float32).eval()


@pytest.fixture
def moe_models(request):
    """name -> (HF directory, transformers model), each built on first use."""
    return lambda name: request.getfixturevalue("moe" if name == "qwen3-moe" else "deepseek")


def recorded_load(model, rows) -> tuple[float, float]:
    """The most and least loaded expert's tokens over the mean (worst layer), from the routes Hugging Face's
    own routers pick (protos.moe_routing's recording), each datum alone."""
    per_datum = []
    for row in rows:
        with torch.no_grad(), recording(model) as recorder:
            model(input_ids=torch.as_tensor(row["model_input"], dtype=torch.long)[None])
        per_datum.append(recorder.forwards()[0])  # [tokens, MoE layers, k]
    routes = torch.cat(per_datum)
    experts = getattr(model.config, "n_routed_experts", None) or model.config.num_experts
    counts = [torch.bincount(routes[:, i].reshape(-1), minlength=experts).double() for i in range(routes.shape[1])]
    return max(float(c.max() / c.mean()) for c in counts), min(float(c.min() / c.mean()) for c in counts)


def router_logits(model, rows) -> list[torch.Tensor]:
    """Per MoE layer, the router logits of every real token of `rows` ([T, E]), each datum alone."""
    per_datum = [
        model(input_ids=torch.as_tensor(row["model_input"], dtype=torch.long)[None], output_router_logits=True)
        for row in rows
    ]
    return [
        torch.cat([out.router_logits[layer] for out in per_datum]) for layer in range(len(per_datum[0].router_logits))
    ]


@pytest.mark.parametrize(
    ("model", "layout"),
    [*(("qwen3-moe", layout) for layout in ("tp1", "pp2", "ep2")), ("deepseek", "pp2")],
)
async def test_expert_load_counts_real_tokens(megatron_learners, moe_models, model, layout):
    """The load equals counts of the routes HF's own routers pick (DeepSeek-V3: sigmoid router, expert bias and
    groups; its dense first layer has none, and at PP2 it and one MoE layer are the first stage's)."""
    model_dir, hf = moe_models(model)
    rows = rows_for("cross_entropy", hf, seed=3)
    most, least = recorded_load(hf, rows)
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
    rows = rows_for("ppo", hf, seed=0)
    with_aux, without_aux = torch_backend(model_dir), torch_backend(model_dir)
    torch_forward(with_aux, rows, "ppo", backward=True)
    switch_aux_loss(with_aux.model, rows, AUX_COEFF).backward()  # onto the policy loss's gradients
    expected = with_aux.optim_step(ADAM)
    torch_forward(without_aux, rows, "ppo", backward=True)
    expected_without = without_aux.optim_step(ADAM)
    stepped, weights = await megatron_step(learner.address, model_dir, rows, ADAM)
    assert stepped.metrics["grad_norm:mean"] == pytest.approx(expected["grad_norm:mean"], rel=1e-4)
    assert stepped.metrics["grad_norm:mean"] != pytest.approx(expected_without["grad_norm:mean"], rel=1e-3)
    assert_weights_match(weights, dict(with_aux.named_weights()))


async def megatron_step(address: str, model_dir, rows, adam: AdamParams) -> tuple:
    """One ppo ForwardBackward + OptimStep on a fresh session: (the step's reply, the weights after it)."""
    async with open_channel(address) as channel:
        client = await megatron_client(channel, model_dir)
        await client.forward_backward(rows, "ppo")
        stepped = await client.optim_step(
            learning_rate=adam.learning_rate, weight_decay=adam.weight_decay, grad_clip_norm=adam.grad_clip_norm,
            eps=adam.eps,
        )  # fmt: skip
        weights = saved_tensors((await client.save_weights(f"after-{client.session_id}")).path)
        await client.stub.CloseSession(close_request(client))
    return stepped, weights


def sampled_routes(hf, rows) -> list[np.ndarray]:
    """Each row's routes as a sampler a step behind would record them: the routers perturbed (noise of half
    their spread), the recording the one protos.moe_routing makes on the rollout."""
    sampler = copy.deepcopy(hf)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in moe_routers(sampler):
            router.weight.add_(0.5 * torch.randn(router.weight.shape, generator=generator) * router.weight.std())
    routes = []
    for row in rows:
        with torch.no_grad(), recording(sampler) as recorder:
            sampler(input_ids=torch.as_tensor(row["model_input"], dtype=torch.long)[None])
        routes.append(recorder.forwards()[0].numpy().reshape(-1))
    return routes


@pytest.mark.parametrize(
    ("model", "layout"),
    [
        *(("qwen3-moe", layout) for layout in ("tp1", "pp2", "ep2", "tp2-ep2")),
        *(("deepseek", layout) for layout in ("pp2", "tp2-ep2")),
    ],
)
async def test_replayed_routes_match_the_torch_backend(megatron_learners, moe_models, model, layout):
    """Megatron's router replay (each micro-batch's routes laid out sequence-major, sliced per TP rank under
    sequence parallelism, per stage's MoE layers) against the torch backend's (protos.moe_routing), both on
    routes that their own routers would not all have picked: Qwen3-MoE's softmax router and DeepSeek-V3's
    sigmoid one (whose dense first layer has no routes)."""
    model_dir, hf = moe_models(model)
    rows = rows_for("ppo", hf, seed=5)
    replayed = [{**row, "routed_experts": routes} for row, routes in zip(rows, sampled_routes(hf, rows), strict=True)]
    reference = torch_backend(model_dir)
    expected = torch_forward(reference, replayed, "ppo", backward=False)
    free = torch_forward(reference, rows, "ppo", backward=False)
    assert expected.metrics["learner/routing_replay_changed:mean"] > 0.05, "the sampler routed otherwise"
    async with open_channel(megatron_learners(*LAYOUTS[layout]).address) as channel:
        client = await megatron_client(channel, model_dir)
        logprobs, _ = await client.forward(replayed, "ppo")
        await client.stub.CloseSession(close_request(client))
    for got, want in zip(logprobs, expected.logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert max(np.abs(w - o).max() for w, o in zip(expected.logprobs, free.logprobs, strict=True)) > 1e-3


@pytest.mark.parametrize("model", ["qwen3-moe", "deepseek"])
async def test_a_replayed_step_matches_the_torch_backend(megatron_learners, moe_models, model):
    """One ppo step on replayed routes at TP2 x EP2: the gradient (its norm) and the weights after it equal the
    torch backend's on the same routes."""
    model_dir, hf = moe_models(model)
    rows = rows_for("ppo", hf, seed=6)
    replayed = [{**row, "routed_experts": routes} for row, routes in zip(rows, sampled_routes(hf, rows), strict=True)]
    reference = torch_backend(model_dir)
    torch_forward(reference, replayed, "ppo", backward=True)
    expected = reference.optim_step(ADAM)
    stepped, weights = await megatron_step(megatron_learners(*LAYOUTS["tp2-ep2"]).address, model_dir, replayed, ADAM)
    assert stepped.metrics["grad_norm:mean"] == pytest.approx(expected["grad_norm:mean"], rel=1e-4)
    deepseek = hf.config.model_type == "deepseek_v3"
    assert_weights_match(weights, dict(reference.named_weights()), 1e-3 if deepseek else None)  # DEEPSEEK_TOLERANCE
