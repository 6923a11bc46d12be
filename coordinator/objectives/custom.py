"""A user's own loss, in torch on the client, over policy-gradient datums (Tinker's forward_backward_custom).

The datums are the policy-gradient ones (`loss_fn_inputs`: target_tokens, the sampler's `logprobs` and
the `advantages`, zero on prompt positions), so a custom loss can read everything a built-in one gets.
It is named by import path in the run config:

    [loop.objective]
    type = "custom"
    loss = "my_package.losses:clipped_reinforce"   # (data, logprobs) -> (loss tensor, metrics)
"""

from __future__ import annotations

import importlib
from typing import Literal

import numpy as np

from coordinator.client.custom_loss import CustomLossFn, forward_backward_custom
from coordinator.client.learner_api import LearnerSession
from coordinator.objectives.base import Objective, ScoredGroup, completion_logprobs
from coordinator.objectives.maths import policy_datum
from coordinator.objectives.policy_gradient import AdvantageConfig
from protos.errors import InvalidArgument


class CustomConfig(AdvantageConfig):
    type: Literal["custom"] = "custom"
    loss: str
    """`package.module:function`: a CustomLossFn, `(data: list[Datum], logprobs: list[torch.Tensor]) ->
    (loss: torch.Tensor, metrics: dict[str, float])`, with `logprobs[i]` the learner's per-target logprobs
    of datum i; it must be importable where `anvil run` runs."""


def load_loss(path: str) -> CustomLossFn:
    module_name, _, attribute = path.partition(":")
    try:
        loss = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise InvalidArgument(
            f"loop.objective.loss = {path!r} cannot be loaded ({exc}); name a function as 'package.module:function'"
        ) from exc
    if not callable(loss):
        raise InvalidArgument(f"loop.objective.loss = {path!r} is not a function")
    return loss


class Custom(Objective):
    def __init__(self, config: CustomConfig) -> None:
        self.config = config
        self.loss = load_loss(config.loss)

    async def accumulate_gradients(
        self, session: LearnerSession, groups: list[ScoredGroup], metrics: dict[str, float]
    ) -> np.ndarray | None:
        entries = self.config.entries(groups)
        if not entries:
            return None
        data = [policy_datum(p, s.tokens, s.logprobs, a, s.token_weight_versions) for p, s, a in entries]
        result = await forward_backward_custom(session, data, self.loss)
        metrics["loss/sum"] = result.metrics["loss:sum"]
        metrics.update({f"custom/{k.split(':')[0]}": v for k, v in result.metrics.items() if "loss:sum" not in k})
        return completion_logprobs(result.loss_fn_outputs, [s for _, s, _ in entries])
