"""How evenly a Mixture-of-Experts model's tokens spread over its experts, per request, for the metrics.

A forward hook on every MoE layer's router counts the tokens routed to each expert, the right padding left
out (the router gets the micro-batch's padding mask). Each rank counts its own tokens (before the all-to-all
sends them to their experts' ranks; under sequence parallelism each TP rank routes its own slice of the
sequence), so a request's counts are the sum over ranks per layer; rank 0 reports
the most loaded expert's tokens over the mean and the least loaded one's, over the layers.
Activation checkpointing routes each micro-batch twice (forward and recompute), which doubles every count
of a layer alike and leaves the ratios as they are.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class ExpertLoad:
    def __init__(self, model: torch.nn.Module, first_layer: int) -> None:
        """`first_layer`: the global number of this pipeline stage's first layer."""
        self.counts: dict[int, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name.endswith(".mlp.router"):
                layer = first_layer + int(name.split("decoder.layers.")[1].split(".")[0])
                module.register_forward_hook(self._counter(layer), with_kwargs=True)

    def _counter(self, layer: int):
        def count(_module, args, kwargs, output) -> None:
            _, routing_map = output  # [tokens, experts] bool, tokens flattened [sequence, batch]
            padding = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            with torch.no_grad():
                real = routing_map if padding is None else routing_map[~padding.reshape(-1)]
                tokens = real.sum(dim=0).to("cpu", torch.float64)
            self.counts[layer] = self.counts.get(layer, torch.zeros_like(tokens)) + tokens

        return count

    def take(self) -> dict[int, list[float]]:
        """This rank's counts since the last take, by global layer."""
        counts, self.counts = self.counts, {}
        return {layer: tokens.tolist() for layer, tokens in counts.items()}


def load_metrics(per_rank: Iterable[Mapping[int, list[float]]]) -> dict[str, float]:
    """The request's load metrics from every rank's counts (summed per layer)."""
    totals: dict[int, torch.Tensor] = {}
    for counts in per_rank:
        for layer, tokens in counts.items():
            totals[layer] = totals.get(layer, torch.zeros(len(tokens), dtype=torch.float64)) + torch.tensor(tokens)
    loaded = [tokens for tokens in totals.values() if tokens.sum() > 0]
    if not loaded:
        return {}
    return {
        "learner/moe_load_max_over_mean:max": max(float(t.max() / t.mean()) for t in loaded),
        "learner/moe_load_min_over_mean:min": min(float(t.min() / t.mean()) for t in loaded),
    }
