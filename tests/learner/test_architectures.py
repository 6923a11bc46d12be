"""The Qwen3 built-ins (dense with q/k norms, and Mixture-of-Experts) and the DeepSeek-V3 one (multi-head
latent attention, shared + routed experts, sigmoid router) through the torch learner: every path
(packed, micro-batched with activation checkpointing, shared prefixes) against each datum alone through
Hugging Face with torch.autograd's gradients, and the weights it publishes under the checkpoint names
vLLM loads (the MoE's fused experts split per expert), equal to what save_pretrained writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from coordinator.models import resolve_model
from protos.checkpoint_names import CheckpointLayout, live_tensors
from tests.learner.test_micro_batches import ATOL, grpo_batch, make_batch, reference, run

ARCHITECTURES = {"anvil-tiny-qwen3": "qwen3", "anvil-tiny-moe": "qwen3_moe", "anvil-tiny-deepseek": "deepseek_v3"}
PATHS = {
    "packed": ({"share_prefixes": False}, make_batch),
    "micro-batches + checkpointing": (
        {"max_tokens_per_micro_batch": 48, "activation_checkpointing": True, "logprob_chunk_tokens": 7},
        make_batch,
    ),
    "shared prefixes": ({"share_prefixes": True, "logprob_chunk_tokens": 5}, grpo_batch),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model_dir(request, anvil_home):
    directory = resolve_model(request.param)
    model = AutoModelForCausalLM.from_pretrained(directory)
    assert model.config.model_type == ARCHITECTURES[request.param]
    return directory


@pytest.mark.parametrize("path", list(PATHS))
def test_learner_equals_each_datum_alone(model_dir, path: str):
    settings, make = PATHS[path]
    batch = make(vocab=512)
    expected_logprobs, expected_loss, expected_grads = reference(model_dir, batch, "ppo")
    backend, result = run(model_dir, batch, "ppo", **settings)
    for got, want in zip(result.logprobs, expected_logprobs, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert result.metrics["loss:sum"] == pytest.approx(expected_loss, abs=1e-4)
    for name, parameter in backend.model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected_grads[name], atol=5e-5, rtol=1e-4, msg=name)


def test_published_names_and_tensors_are_the_checkpoints(model_dir, tmp_path):
    """What PublishWeights sends is, name for name and bit for bit, the model.safetensors a fresh
    save_pretrained writes, after a real optimizer step (so not just the file it loaded)."""
    backend, _ = run(model_dir, make_batch(vocab=512), "ppo")
    from protos.adam import AdamParams

    backend.optim_step(AdamParams(learning_rate=1e-2))
    published = dict(backend.named_weights())
    backend.model.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(tmp_path / "model.safetensors")
    assert set(published) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(published[name], tensor), name
    original = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(original[name], saved[name]) for name in saved), "the step changed the weights"


def test_layout_loads_checkpoint_names_into_fused_parameters(model_dir):
    """A model overwritten, then loaded through the layout from the file, equals the model from_pretrained
    loads (DeepSeek-V3's router bias, a buffer, included); every expert slot of an MoE is a view (no copy
    on publish)."""
    source = AutoModelForCausalLM.from_pretrained(model_dir)
    target = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for tensor in live_tensors(target).values():  # parameters and persistent buffers
            tensor.fill_(0.5)
    layout = CheckpointLayout(target)
    files = load_file(model_dir / "model.safetensors")
    assert sorted(layout.names) == sorted(files)
    layout.load(live_tensors(target), files)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    fused = not layout.is_identity
    assert fused == (source.config.model_type in ("qwen3_moe", "deepseek_v3"))
    live = live_tensors(target)
    storages = {t.untyped_storage().data_ptr() for t in live.values()}
    for name, tensor in layout.named_tensors(live):
        if ".experts." in name:  # the fused parameter's own memory, not a gathered copy
            assert tensor.untyped_storage().data_ptr() in storages, f"{name} was copied"
