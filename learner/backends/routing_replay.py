"""Routing replay in the torch learner: a micro-batch whose data carry `routed_experts` runs with every
router forced to those experts (protos.moe_routing), laid out like the packed rows the decoder sees.

The batch's routes are checked against the model before anything runs (a rollout serving another model, or
a corrupt column, is refused with nothing changed), and the fraction of routes the learner would have chosen
differently on its own is reported (`learner/routing_replay_changed:mean`): the mismatch replay removes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from learner.backends.packing import packed_rows, packed_token_index
from protos.errors import FailedPrecondition, InvalidArgument
from protos.moe_routing import moe_routers, replaying


def check_routes(model: torch.nn.Module, routes: Sequence[np.ndarray], lengths: Sequence[int]) -> None:
    """InvalidArgument / FailedPrecondition unless every datum's routes fit this model: N x L x k ids in range."""
    routers = moe_routers(model)
    if not routers:
        raise FailedPrecondition(
            f"the batch carries routed_experts for routing replay, but this learner's model "
            f"({type(model).__name__}) has no Mixture-of-Experts router; turn routing replay off"
        )
    check_routes_fit(routes, lengths, len(routers), routers[0].top_k, routers[0].num_experts)


def check_routes_fit(
    routes: Sequence[np.ndarray], lengths: Sequence[int], layers: int, top_k: int, experts: int
) -> None:
    """InvalidArgument unless each datum has lengths x layers x top_k expert ids, each below `experts`."""
    for index, (values, length) in enumerate(zip(routes, lengths, strict=True)):
        if values.size != length * layers * top_k:
            raise InvalidArgument(
                f"datum {index}: routed_experts has {values.size} values; this model needs {length} positions x "
                f"{layers} MoE layers x {top_k} experts = {length * layers * top_k} (sampled from another model?)"
            )
        if values.size and int(values.max()) >= experts:
            raise InvalidArgument(
                f"datum {index}: routed_experts holds expert {int(values.max())}; this model has {experts}"
            )


def routes_by_position(
    routes: Sequence[np.ndarray], lengths: Sequence[int], attention: str, layers: int, top_k: int
) -> torch.Tensor:
    """[rows * width, L, k] routes in packing.pack's flattened layout of these sequences; -1 on padding."""
    rows, width = packed_rows(lengths, attention)
    plan = torch.full((len(rows) * width, layers, top_k), -1, dtype=torch.long)
    index = packed_token_index(lengths, attention)
    plan[index] = torch.from_numpy(np.concatenate(routes).astype(np.int64)).view(-1, layers, top_k)
    return plan


@contextlib.contextmanager
def replay_routes(
    model: torch.nn.Module, routes: Sequence[np.ndarray] | None, lengths: Sequence[int], attention: str,
    metrics: dict[str, float],
) -> Iterator[bool]:  # fmt: skip
    """Open for a micro-batch's forward and backward: routes replayed when the data carry them (yields
    whether they do). Adds `learner/routing_replay_changed:mean` to `metrics`."""
    if routes is None:
        yield False
        return
    routers = moe_routers(model)
    plan = routes_by_position(routes, lengths, attention, len(routers), routers[0].top_k)
    with replaying(model, plan) as changed:
        yield True
    if changed.routes:
        metrics["learner/routing_replay_changed:mean"] = changed.differing / changed.routes
