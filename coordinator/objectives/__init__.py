"""RL objectives behind one interface (`base.Objective`), chosen by `[loop.objective] type = "..."`.

`ObjectiveConfig` is the config union keyed on `type` and `make_objective` the one factory:
importance_sampling / ppo / cispo (`policy_gradient`), dpo (`dpo`), custom (`custom`). A new objective
is a new module with a config class and an Objective subclass, added to both below.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from coordinator.objectives.base import Objective, ScoredGroup
from coordinator.objectives.custom import Custom, CustomConfig
from coordinator.objectives.dpo import DPO, DPOConfig
from coordinator.objectives.policy_gradient import PolicyGradient, PolicyGradientConfig

ObjectiveConfig = Annotated[PolicyGradientConfig | DPOConfig | CustomConfig, Field(discriminator="type")]


_OBJECTIVES: dict[type, type[Objective]] = {PolicyGradientConfig: PolicyGradient, DPOConfig: DPO, CustomConfig: Custom}


def make_objective(config: PolicyGradientConfig | DPOConfig | CustomConfig) -> Objective:
    return _OBJECTIVES[type(config)](config)


__all__ = ["Objective", "ObjectiveConfig", "ScoredGroup", "make_objective"]
