"""Routing replay (R3) for Mixture-of-Experts models: record the experts each token was routed to, and
make a later forward route exactly so.

Why: a sampler and a learner holding the same weights still disagree on some routing decisions (a top-k
is discontinuous, and kernels differ in rounding), and in an asynchronous loop the learner's weights are
a step ahead of the sampler's. A token routed to other experts than it was sampled with gets a logprob
from a different network, which inflates the sampler/learner mismatch far beyond a dense model's. With
replay on, the rollout returns the experts each position was routed to, and the learner forces the same
choice (the gate weights are still computed, differentiably, from the learner's own router logits at the
forced experts), so training scores each token with the network that sampled it.

Routes are int32 arrays [positions, moe_layers, top_k]: one row per position the model read (the prompt
and each generated token but the last, i.e. a datum's `model_input`), one slab per MoE layer in module
order, the chosen experts in the router's own order.

Routers are Hugging Face's own modules (`mlp.gate` of Qwen3-MoE, DeepSeek-V3, ...), which return
(router_logits, top_k weights, top_k indices); each kind's weights-from-indices rule is in ROUTER_WEIGHTS.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from protos.errors import FailedPrecondition


def _softmax_weights(router: torch.nn.Module, logits_NE: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """Qwen3-MoE / Qwen2-MoE / Mixtral: softmax over all experts, the chosen ones' probabilities,
    renormalised over the top k when the model does."""
    weights_NK = torch.softmax(logits_NE, dtype=torch.float, dim=-1).gather(1, experts_NK)
    if getattr(router, "norm_topk_prob", False):
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    return weights_NK.to(logits_NE.dtype)


def _sigmoid_weights(router: torch.nn.Module, logits_NE: torch.Tensor, experts_NK: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3: sigmoid scores of the chosen experts (the selection bias never weighs), renormalised,
    times the routed scaling factor."""
    weights_NK = logits_NE.float().sigmoid().gather(1, experts_NK)
    if router.norm_topk_prob:
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return weights_NK * router.routed_scaling_factor


ROUTER_WEIGHTS: dict[str, Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "Qwen3MoeTopKRouter": _softmax_weights,
    "Qwen2MoeTopKRouter": _softmax_weights,
    "MixtralTopKRouter": _softmax_weights,
    "DeepseekV3TopkRouter": _sigmoid_weights,
}
"""Router class name -> the gate weights of given experts from its logits, as the router computes them."""


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's routers in layer order (empty for a dense model)."""
    return [module for module in model.modules() if type(module).__name__ in ROUTER_WEIGHTS]


def routing_shape(model: torch.nn.Module) -> tuple[int, int]:
    """(moe_layers, top_k) of a model's routes; (0, 0) for a dense model."""
    routers = moe_routers(model)
    return (len(routers), routers[0].top_k) if routers else (0, 0)


class RouteRecorder:
    """Collects every router's chosen experts per forward call while `recording(model)` is open: `calls`
    holds, per forward, one [tokens, top_k] tensor per MoE layer (tokens in the flattened [batch * length]
    order the router sees)."""

    def __init__(self) -> None:
        self.calls: list[list[torch.Tensor]] = []
        self._current: list[torch.Tensor] = []
        self._layers = 0

    def layer_output(self, layer: int, experts_NK: torch.Tensor) -> None:
        if layer == 0 and self._current:
            self.calls.append(self._current)
            self._current = []
        self._current.append(experts_NK.detach().to("cpu", torch.int32))

    def forwards(self) -> list[torch.Tensor]:
        """Each recorded forward as [tokens, moe_layers, top_k]."""
        calls = [*self.calls, self._current] if self._current else self.calls
        return [torch.stack(layers, dim=1) for layers in calls]


@contextlib.contextmanager
def recording(model: torch.nn.Module) -> Iterator[RouteRecorder]:
    """Record the experts every router picks, in every forward run inside the block."""
    recorder = RouteRecorder()
    handles = [
        router.register_forward_hook(lambda _m, _i, out, layer=layer: recorder.layer_output(layer, out[2]))
        for layer, router in enumerate(moe_routers(model))
    ]
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ReplayCount:
    """Routes (position x layer, padding excluded) replayed, and how many the model would have chosen otherwise."""

    routes: int = 0
    differing: int = 0


@contextlib.contextmanager
def replaying(model: torch.nn.Module, routes_NLK: torch.Tensor) -> Iterator[ReplayCount]:
    """Inside the block every forward routes position n of MoE layer l to experts routes_NLK[n, l]
    (positions in the flattened [batch * length] order the routers see); rows of -1 route freely (padding).
    The gate weights come from the model's own logits at those experts, so gradients reach the router.
    Kept open through backward: activation checkpointing reruns the forward there."""
    routers = moe_routers(model)
    if not routers:
        raise FailedPrecondition(
            f"routing replay needs a Mixture-of-Experts model; {type(model).__name__} has no router"
        )
    if routes_NLK.dim() != 3 or routes_NLK.shape[1:] != (len(routers), routers[0].top_k):
        raise FailedPrecondition(
            f"routes of shape {list(routes_NLK.shape)} do not fit this model: it has {len(routers)} MoE layers "
            f"routing to {routers[0].top_k} experts each (the rollout must serve the learner's model)"
        )
    originals = [router.forward for router in routers]
    count = ReplayCount()
    for layer, router in enumerate(routers):
        router.forward = _replaying_forward(router, router.forward, routes_NLK[:, layer].long(), count)
    try:
        yield count
    finally:
        for router, original in zip(routers, originals, strict=True):
            router.forward = original


def _replaying_forward(
    router: torch.nn.Module, original: Callable, routes_NK: torch.Tensor, count: ReplayCount
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    weights_of = ROUTER_WEIGHTS[type(router).__name__]

    def forward(hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits_NE, free_weights_NK, free_NK = original(hidden_states)
        if logits_NE.shape[0] != routes_NK.shape[0]:
            raise FailedPrecondition(
                f"routing replay got {logits_NE.shape[0]} positions for {routes_NK.shape[0]} recorded routes"
            )
        routes = routes_NK.to(free_NK.device)
        free = routes[:, 0] < 0
        experts_NK = torch.where(free[:, None], free_NK, routes)
        with torch.no_grad():  # the same experts in another order are the same route
            same = (free_NK.sort(dim=-1).values == routes.sort(dim=-1).values).all(dim=-1)
            count.routes += int((~free).sum())
            count.differing += int((~same & ~free).sum())
        weights_NK = torch.where(free[:, None], free_weights_NK, weights_of(router, logits_NE, experts_NK.clamp(min=0)))
        return logits_NE, weights_NK.to(free_weights_NK.dtype), experts_NK

    return forward
