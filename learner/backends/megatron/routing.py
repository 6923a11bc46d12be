"""Routing replay (R3) in the Megatron learner: a batch whose data carry `routed_experts` (the experts each
position was routed to when sampled) runs with every router forced to them, through megatron-core's own
router replay (`moe_enable_routing_replay`: the router gathers its scores at the given experts, so the gate
weights stay its own and differentiable).

Each micro-batch's routes are laid out as the routers see their tokens: the right-padded [batch, length]
micro-batch flattened sequence-major, cut to this TP rank's slice of the sequence under sequence
parallelism, one tensor per MoE layer of this pipeline stage. Padding (and a filler micro-batch) routes to
experts 0..k-1: those positions reach no loss. The targets are set as each micro-batch's forward starts and
stay through its backward, which is where activation checkpointing routes it again; with pipeline stages
interleaving micro-batches that would be the wrong one, so that combination is refused.
"""

from __future__ import annotations

import torch

from learner.backends.megatron import schedule
from protos.errors import FailedPrecondition


def replays(model: torch.nn.Module) -> list:
    """This stage's routers' replay handles (RouterReplay), in layer order."""
    return [module.router_replay for module in model.modules() if getattr(module, "router_replay", None) is not None]


def check_replayable(pp: int, activation_checkpointing: bool) -> None:
    if pp > 1 and activation_checkpointing:
        raise FailedPrecondition(
            "routing replay with pp > 1 and activation checkpointing: a recomputed layer would route another "
            "micro-batch's way; turn one of them off"
        )


def micro_batch_routes(
    micro_batch: schedule.MicroBatch, layers: range, top_k: int, tp_rank: int, tp: int, sequence_parallel: bool
) -> list[torch.Tensor]:
    """One [tokens, top_k] tensor per MoE layer in `layers` (global numbers), tokens as this rank's routers
    see them."""
    batch, length = micro_batch.input_ids_BL.shape
    routes_BLMK = torch.arange(top_k).expand(batch, length, len(layers), top_k).clone()  # padding: 0..k-1
    for row, datum in enumerate(micro_batch.data):
        if datum is schedule.IDLE:
            continue
        values = torch.from_numpy(datum.routed_experts.astype("int64"))
        per_position = values.view(len(datum.model_input), -1, top_k)  # [positions, all MoE layers, k]
        routes_BLMK[row, : len(datum.model_input)] = per_position[:, layers.start : layers.stop]
    routes_LBMK = routes_BLMK.transpose(0, 1)
    if sequence_parallel:
        part = length // tp
        routes_LBMK = routes_LBMK[tp_rank * part : (tp_rank + 1) * part]
    flat = routes_LBMK.reshape(-1, len(layers), top_k)
    return [flat[:, layer].contiguous().to(micro_batch.input_ids_BL.device) for layer in range(len(layers))]


def start(handles: list, routes: list[torch.Tensor]) -> None:
    """Force this micro-batch's routes (kept until `stop`, through its backward)."""
    from megatron.core.transformer.moe.router_replay import RouterReplayAction

    for handle, layer_routes in zip(handles, routes, strict=True):
        handle.clear_indices()
        handle.set_target_indices(layer_routes)
        handle.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)


def stop(handles: list) -> None:
    """Back to the routers' own choice; nothing kept."""
    for handle in handles:
        handle.clear_indices()
        handle.clear_router_replay_action()
