"""Routing replay (R3) in the torch learner, on the MoE built-ins (Qwen3-MoE's softmax router, DeepSeek-V3's
grouped sigmoid router with its selection bias).

* Replaying the routes the model itself picks changes nothing: logprobs, loss and every gradient equal each
  datum alone through Hugging Face with its own routing (so the gate weights at forced experts are the
  router's own, and the routes land on the right packed positions), on the packed path and on the
  micro-batched one with activation checkpointing (where backward reruns the routers).
* Routes recorded by other weights (a sampler a step behind) are what the learner's routers then use, at
  every position; the learner reports the fraction it would have routed otherwise, which is about the
  fraction computed here from Hugging Face's own routing.
* Routes that do not fit the model are refused before anything runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from coordinator.models import resolve_model
from learner.backends.torch_backend import TorchBackend
from learner.batch import Datum, TrainingBatch, batch_from_arrow
from learner.config import TorchBackendConfig
from learner.losses import LOSSES
from protos.arrow_schemas import encode_batch, make_batch
from protos.batch_validation import validate_batch
from protos.errors import FailedPrecondition, InvalidArgument
from protos.moe_routing import moe_routers, recording
from tests.learner.test_micro_batches import ATOL, reference
from tests.learner.test_micro_batches import make_batch as random_batch

MOE_MODELS = ["anvil-tiny-moe", "anvil-tiny-deepseek"]
PATHS = {
    "packed": {"share_prefixes": True},  # replay turns sharing off: the routes are laid out per datum
    "micro-batches + checkpointing": {
        "max_tokens_per_micro_batch": 48, "activation_checkpointing": True, "logprob_chunk_tokens": 7,
    },
}  # fmt: skip


@pytest.fixture(scope="module", params=MOE_MODELS)
def moe_dir(request, anvil_home):
    return resolve_model(request.param)


def own_routes(model: torch.nn.Module, datum: Datum) -> np.ndarray:
    """[N * L * k] experts `model` routes the datum's input to, read alone (no packing)."""
    with torch.no_grad(), recording(model) as recorder:
        model(input_ids=torch.from_numpy(datum.model_input)[None])
    (routes,) = recorder.forwards()
    return routes.numpy().reshape(-1)


def with_routes(batch: TrainingBatch, routes: list[np.ndarray]) -> TrainingBatch:
    data = [
        Datum(d.model_input, d.target_tokens, d.targets_per_position, d.loss_inputs, r)
        for d, r in zip(batch.data, routes, strict=True)
    ]
    return TrainingBatch(data, batch.input_names)


def forward(backend: TorchBackend, batch: TrainingBatch):
    spec = LOSSES["ppo"]
    return backend.forward(batch, spec, dict(spec.defaults), backward=True)


@pytest.mark.parametrize("path", list(PATHS))
def test_replaying_the_models_own_routes_equals_free_routing(moe_dir, path):
    batch = random_batch(vocab=512)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    replayed = with_routes(batch, [own_routes(model, d) for d in batch.data])
    expected_logprobs, expected_loss, expected_grads = reference(moe_dir, batch, "ppo")
    backend = TorchBackend(moe_dir, TorchBackendConfig(device="cpu", **PATHS[path]), seed=0)
    result = forward(backend, replayed)
    for got, want in zip(result.logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)
    for name, parameter in backend.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], atol=5e-5, rtol=1e-4, msg=name)
    assert result.metrics["learner/routing_replay_changed:mean"] == 0.0


def test_the_learner_routes_as_the_sampler_recorded(moe_dir):
    """The sampler's weights differ from the learner's (its routers perturbed, as a step of training would):
    with its routes replayed, the learner's routers use exactly those experts at every position."""
    batch = random_batch(vocab=512, seed=4)
    learner_view = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    sampler = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for router in moe_routers(sampler):
            router.weight.add_(0.5 * torch.randn(router.weight.shape, generator=generator) * router.weight.std())
    sampled = [own_routes(sampler, d) for d in batch.data]
    free = [own_routes(learner_view, d) for d in batch.data]
    top_k = moe_routers(sampler)[0].top_k
    differing = [
        (np.sort(s.reshape(-1, top_k), axis=1) != np.sort(f.reshape(-1, top_k), axis=1)).any(axis=1)
        for s, f in zip(sampled, free, strict=True)
    ]
    expected_changed = float(np.concatenate(differing).mean())
    assert expected_changed > 0.05, "the perturbation must move some routes for this test to mean anything"

    backend = TorchBackend(moe_dir, TorchBackendConfig(device="cpu", share_prefixes=False), seed=0)
    with recording(backend.model) as recorder:
        result = forward(backend, with_routes(batch, sampled))
    (used,) = recorder.forwards()  # one packed micro-batch: positions in the packed layout, padding included
    from learner.backends.packing import packed_token_index

    index = packed_token_index([len(d.model_input) for d in batch.data], backend.model.config._attn_implementation)
    np.testing.assert_array_equal(used[index].numpy().reshape(-1), np.concatenate(sampled))
    # The learner's own choice at a layer is judged on hidden states that the replayed layers below produced,
    # Hugging Face's here on its own routing throughout: the first layer agrees exactly, the rest nearly.
    assert result.metrics["learner/routing_replay_changed:mean"] == pytest.approx(expected_changed, abs=0.03)

    free_logprobs, _, _ = reference(moe_dir, batch, "ppo")
    gaps = [np.abs(got - want).max() for got, want in zip(result.logprobs, free_logprobs, strict=True)]
    assert max(gaps) > 1e-3, "other experts give other logprobs"


def test_routes_that_do_not_fit_are_refused_with_nothing_changed(moe_dir, tiny_model_dir):
    batch = random_batch(vocab=512)
    model = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    routes = [own_routes(model, d) for d in batch.data]
    backend = TorchBackend(moe_dir, TorchBackendConfig(device="cpu"), seed=0)
    short = [*routes[:2], routes[2][:-1], *routes[3:]]
    with pytest.raises(InvalidArgument, match=r"datum 2: routed_experts has .* MoE layers"):
        forward(backend, with_routes(batch, short))
    experts = moe_routers(model)[0].num_experts
    too_high = [*routes[:1], np.full_like(routes[1], experts), *routes[2:]]
    with pytest.raises(InvalidArgument, match=f"datum 1: routed_experts holds expert {experts}"):
        forward(backend, with_routes(batch, too_high))
    assert all(p.grad is None for p in backend.model.parameters()), "nothing ran"

    dense = TorchBackend(tiny_model_dir, TorchBackendConfig(device="cpu"), seed=0)
    with pytest.raises(FailedPrecondition, match="no Mixture-of-Experts router; turn routing replay off"):
        forward(dense, with_routes(batch, routes))


def test_routes_travel_in_the_arrow_batch_as_int32():
    row = {
        "model_input": np.array([5, 6, 7]), "target_tokens": np.array([6, 7, 8]),
        "routed_experts": np.arange(3 * 4 * 2, dtype=np.int32),
    }  # fmt: skip
    decoded = batch_from_arrow(encode_batch(make_batch([row])), vocab_size=512)
    assert decoded.data[0].routed_experts.dtype == np.int32
    np.testing.assert_array_equal(decoded.data[0].routed_experts, np.arange(24))
    for bad, says in ((np.arange(7), "7 values for 3 positions"), (np.full(6, -1), "expert id -1")):
        with pytest.raises(InvalidArgument, match=says):
            validate_batch(make_batch([{**row, "routed_experts": bad}]))
