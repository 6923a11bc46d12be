"""Custom losses to start from (`[loop.objective] type = "custom"`): Tinker's built-ins written in torch on
the client, so a variant is a copy and an edit. Each is a CustomLossFn over policy-gradient datums:
`logprobs[i]` are the learner's per-target logprobs of datum i; the datum carries the sampler's
`logprobs` and the `advantages` (both zero on prompt positions)."""

from __future__ import annotations

import torch

from coordinator.client.types import Datum


def importance_sampling(data: list[Datum], logprobs: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """-Σ A · exp(lp − lp_sampler): the same loss, and gradient, as the learner's `importance_sampling`."""
    total = torch.zeros((), dtype=torch.float32)
    ratio_sum, tokens = 0.0, 0
    for datum, learner_lp in zip(data, logprobs, strict=True):
        sampler_lp = datum.loss_fn_inputs["logprobs"].to_torch()
        advantages = datum.loss_fn_inputs["advantages"].to_torch()
        ratio = torch.exp(learner_lp - sampler_lp)
        total = total - (advantages * ratio).sum()
        trained = advantages != 0
        ratio_sum += float(ratio.detach()[trained].sum())
        tokens += int(trained.sum())
    return total, {"ratio:mean": ratio_sum / max(tokens, 1)}
