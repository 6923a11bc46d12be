"""Test helpers: teacher-forced logprobs with transformers, perturbed weights, and weight pushes."""

from __future__ import annotations

import copy

import torch

from protos.weights_codec import TensorBytes


def teacher_forced_logprobs(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one float32 transformers forward pass."""
    logprobs = next_token_logprobs(model, tokens)
    return logprobs.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0]


def next_token_logprobs(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """[len(tokens) - 1, vocab]: row i is the log-softmax over the token at position i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([tokens])).logits[0, :-1].float(), dim=-1)


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A copy of `model` with every parameter moved by seeded Gaussian noise."""
    changed = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)
    return changed


def tensor_bytes(model: torch.nn.Module) -> list[TensorBytes]:
    return [
        TensorBytes(
            name,
            str(p.dtype).removeprefix("torch."),
            tuple(p.shape),
            p.detach().contiguous().view(torch.uint8).numpy().tobytes(),
        )
        for name, p in model.named_parameters()
    ]
