"""The Mixture-of-Experts part of the Hugging Face <-> Megatron conversion (learner/backends/megatron/convert.py):
Qwen3-MoE's router and experts.

  model.layers.i.mlp.gate                 -> decoder.layers.i.mlp.router                             [E, H]
  model.layers.i.mlp.experts.e.[gate; up] -> decoder.layers.i.mlp.experts.local_experts.e.linear_fc1 [2I, H]
  model.layers.i.mlp.experts.e.down_proj  -> decoder.layers.i.mlp.experts.local_experts.e.linear_fc2 [H, I]

The Hugging Face names are the checkpoint's (one tensor per expert, as model.safetensors holds them and vLLM
loads them; transformers fuses them in memory). Megatron's SequentialMLP numbers its experts locally: with
experts split over `ep` ranks, rank r holds experts r * E/ep to (r + 1) * E/ep - 1 as local 0 ... E/ep - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

ROUTER = "mlp.router.weight"
EXPERTS = "mlp.experts.local_experts."


def problems(hf_config, tp: int, ep: int = 1) -> list[str]:
    """What this backend cannot do (yet) with a Qwen3-MoE model, in words."""
    found = []
    if hf_config.num_experts % ep:
        found.append(f"{hf_config.num_experts} experts cannot be split evenly over ep={ep} ranks")
    if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        found.append("dense layers between the MoE ones (mlp_only_layers / decoder_sparse_step)")
    return found


def layer_names(layer: str, num_experts: int) -> list[str]:
    """A MoE layer's router and expert parameter names under the layer prefix `layer`."""
    names = [layer + ROUTER]
    for expert in range(num_experts):
        names += [f"{layer}{EXPERTS}{expert}.linear_fc{i}.weight" for i in (1, 2)]
    return names


def local_expert_name(rest: str, ep_rank: int, ep: int, num_experts: int) -> str | None:
    """A layer's parameter name as expert-parallel rank `ep_rank` of `ep` numbers it (its experts are the
    contiguous block ep_rank * E/ep ...), or None for another rank's expert. The router is on every rank."""
    if EXPERTS not in rest:
        return rest
    expert, linear = rest.removeprefix(EXPERTS).split(".", 1)
    per_rank = num_experts // ep
    local = int(expert) - ep_rank * per_rank
    return f"{EXPERTS}{local}.{linear}" if 0 <= local < per_rank else None


def is_expert(name: str) -> bool:
    """An expert's parameter (split over expert-parallel ranks), as opposed to the router or a dense one."""
    return EXPERTS in name


def is_moe_name(name: str) -> bool:
    return name.endswith(ROUTER) or EXPERTS in name


def hf_to_megatron(rest: str, prefix: str, hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The Megatron tensor `rest` of the layer whose HF names start with `prefix`."""
    if rest == ROUTER:
        return hf(prefix + "mlp.gate.weight")
    expert, linear = rest.removeprefix(EXPERTS).split(".", 1)
    source = f"{prefix}mlp.experts.{expert}."
    if linear == "linear_fc1.weight":
        return torch.cat([hf(source + "gate_proj.weight"), hf(source + "up_proj.weight")])
    return hf(source + "down_proj.weight")


def megatron_to_hf(rest: str, prefix: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors the Megatron tensor `rest` of the layer at `prefix` holds."""
    if rest == ROUTER:
        yield prefix + "mlp.gate.weight", tensor
        return
    expert, linear = rest.removeprefix(EXPERTS).split(".", 1)
    target = f"{prefix}mlp.experts.{expert}."
    if linear == "linear_fc1.weight":
        gate, up = tensor.chunk(2)
        yield target + "gate_proj.weight", gate
        yield target + "up_proj.weight", up
    else:
        yield target + "down_proj.weight", tensor
