"""Online DPO: the best and worst sample of each group as a (chosen, rejected) pair, the sampling policy
as the reference, trained through the client-side two-pass forward_backward_custom."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from coordinator.client.custom_loss import forward_backward_custom
from coordinator.client.learner_api import LearnerSession
from coordinator.client.types import Datum
from coordinator.objectives.base import Objective, ScoredGroup
from coordinator.objectives.maths import dpo_datum, dpo_loss


class DPOConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["dpo"] = "dpo"
    beta: float = Field(default=0.1, gt=0)
    """Strength of the implicit KL regularisation towards the reference (the sampling policy)."""


class DPO(Objective):
    def __init__(self, config: DPOConfig) -> None:
        self.config = config

    async def accumulate_gradients(
        self, session: LearnerSession, groups: list[ScoredGroup], metrics: dict[str, float]
    ) -> np.ndarray | None:
        data: list[Datum] = []
        lengths: list[int] = []
        references: list[float] = []
        for group in groups:
            best, worst = int(np.argmax(group.rewards)), int(np.argmin(group.rewards))
            if group.rewards[best] <= group.rewards[worst]:
                continue
            for index in (best, worst):
                sequence = group.sequences[index]
                data.append(dpo_datum(group.prompt, sequence.tokens))
                lengths.append(len(sequence.tokens))
                references.append(float(sum(sequence.logprobs)))
        metrics["dpo/pairs"] = float(len(data) // 2)
        if not data:
            return None
        result = await forward_backward_custom(session, data, dpo_loss(lengths, references, self.config.beta))
        metrics["loss/sum"] = result.metrics["loss:sum"]
        metrics["dpo/accuracy"] = result.metrics["dpo_accuracy:mean"]
        return None
