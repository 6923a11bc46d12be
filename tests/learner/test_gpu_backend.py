"""The torch backend on a CUDA device: bf16 compute with float32 master weights, over the real server.

Skipped without a GPU (conftest), run with `pytest -m gpu` on a machine that has one. Tolerances are
bf16's: logprobs within 0.1 of a float32 CPU forward, gradients pointing the same way (cosine > 0.99).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from learner.backends.torch_backend import TorchBackend
from learner.config import TorchBackendConfig
from tests.learner.client import random_rows

pytestmark = pytest.mark.gpu


@pytest.fixture
def learner_config(learner_config):
    learner_config.backend = TorchBackendConfig(device="cuda")
    return learner_config


async def test_cuda_session_keeps_fp32_master_weights_and_matches_fp32_maths(client, tiny_model_dir):
    assert isinstance(client.backend, TorchBackend)
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in client.model.parameters())

    rows = random_rows(client.backend.description.vocab_size, lengths=(32, 17, 25))
    logprobs, metrics = await client.forward_backward(rows)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    total = torch.zeros(())
    for row, server_lp in zip(rows, logprobs, strict=True):
        ids = torch.as_tensor(row["model_input"])[None]
        lp = torch.log_softmax(reference(input_ids=ids).logits[0], -1)
        lp = lp.gather(1, torch.as_tensor(row["target_tokens"])[:, None])[:, 0]
        assert torch.allclose(torch.from_numpy(server_lp), lp.detach(), atol=0.1)
        total = total - (torch.as_tensor(row["weights"]) * lp).sum()
    total.backward()
    assert metrics["loss:sum"] == pytest.approx(total.item(), rel=0.02, abs=0.5)

    server_grad = torch.cat([p.grad.float().cpu().flatten() for p in client.model.parameters()])
    reference_grad = torch.cat([p.grad.flatten() for p in reference.parameters()])
    cosine = torch.nn.functional.cosine_similarity(server_grad, reference_grad, dim=0).item()
    assert cosine > 0.99, cosine

    before = client.parameters_snapshot()
    reply = await client.optim_step(learning_rate=1e-3, grad_clip_norm=1.0)
    assert reply.step == 1
    assert all(p.dtype == torch.float32 for p in client.model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in client.parameters_snapshot().items())


async def test_cuda_state_round_trip_is_bit_identical(client):
    vocab = client.backend.description.vocab_size
    await client.forward_backward(random_rows(vocab))
    await client.optim_step(learning_rate=1e-3)
    saved = await client.save_state("gpu")
    params = client.parameters_snapshot()
    await client.forward_backward(random_rows(vocab, seed=3))
    await client.optim_step(learning_rate=1e-3)
    await client.load_state(saved.path)
    assert all(torch.equal(p, params[n]) for n, p in client.parameters_snapshot().items())
    weights = await client.save_weights("gpu-weights")
    loaded = AutoModelForCausalLM.from_pretrained(weights.path, dtype=torch.float32)
    for name, parameter in loaded.named_parameters():
        assert torch.equal(parameter, params[name].cpu()), name
