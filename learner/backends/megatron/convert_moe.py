"""The Mixture-of-Experts part of the Hugging Face <-> Megatron conversion (learner/backends/megatron/convert.py):
Qwen3-MoE's and DeepSeek-V3's routers and experts.

  model.layers.i.mlp.gate                 -> decoder.layers.i.mlp.router                             [E, H]
  mlp.gate.e_score_correction_bias        -> mlp.router.expert_bias (DeepSeek-V3; a buffer in both)  [E]
  model.layers.i.mlp.experts.e.[gate; up] -> decoder.layers.i.mlp.experts.local_experts.e.linear_fc1 [2I, H]
  model.layers.i.mlp.experts.e.down_proj  -> decoder.layers.i.mlp.experts.local_experts.e.linear_fc2 [H, I]
  mlp.shared_experts.[gate; up] / down    -> mlp.shared_experts.linear_fc1 / linear_fc2 (DeepSeek-V3; split
                                             over TP like a dense MLP, convert.py)

The Hugging Face names are the checkpoint's (one tensor per expert, as model.safetensors holds them and vLLM
loads them; transformers fuses them in memory). Megatron's SequentialMLP numbers its experts locally: with
experts split over `ep` ranks, rank r holds experts r * E/ep to (r + 1) * E/ep - 1 as local 0 ... E/ep - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

ROUTER = "mlp.router.weight"
EXPERT_BIAS = "mlp.router.expert_bias"
EXPERTS = "mlp.experts.local_experts."
SHARED = "mlp.shared_experts."
EXPERT_COUNT_FIELDS = {"qwen3_moe": "num_experts", "deepseek_v3": "n_routed_experts"}


def num_experts(hf_config) -> int:
    """Routed experts per MoE layer (Qwen3-MoE's num_experts, DeepSeek-V3's n_routed_experts); 0: dense."""
    field = EXPERT_COUNT_FIELDS.get(getattr(hf_config, "model_type", "?"))
    return int(getattr(hf_config, field)) if field else 0


def problems(hf_config, ep: int = 1) -> list[str]:
    """What this backend cannot do (yet) with a Qwen3-MoE or DeepSeek-V3 model's experts, in words."""
    found, experts, top_k = [], num_experts(hf_config), int(hf_config.num_experts_per_tok)
    if experts % ep:
        found.append(f"{experts} experts cannot be split evenly over ep={ep} ranks")
    if getattr(hf_config, "mlp_only_layers", None) or getattr(hf_config, "decoder_sparse_step", 1) != 1:
        found.append("dense layers between the MoE ones (mlp_only_layers / decoder_sparse_step)")
    if hf_config.model_type == "deepseek_v3":
        if not hf_config.norm_topk_prob:  # Megatron's sigmoid router always renormalises its top-k
            found.append("norm_topk_prob = false")
        if hf_config.n_group > 1 and top_k != 2 * hf_config.topk_group:
            # HF scores a group by its best two experts, Megatron by its best top_k / topk_group
            found.append(f"grouped top-k with num_experts_per_tok={top_k} != 2 * topk_group={hf_config.topk_group}")
    return found


def layer_names(layer: str, num_experts: int, expert_bias: bool = False, shared: bool = False) -> list[str]:
    """A MoE layer's router, expert and shared-expert weight names under the layer prefix `layer`; the
    expert bias is a buffer, but a weight of the checkpoint (and so of the conversion)."""
    names = [layer + ROUTER] + ([layer + EXPERT_BIAS] if expert_bias else [])
    for expert in range(num_experts):
        names += [f"{layer}{EXPERTS}{expert}.linear_fc{i}.weight" for i in (1, 2)]
    return names + ([f"{layer}{SHARED}linear_fc{i}.weight" for i in (1, 2)] if shared else [])


def model_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, and the routers' expert biases: what a checkpoint holds."""
    buffers = {name: b for name, b in model.named_buffers() if name.endswith(EXPERT_BIAS)}
    return {**dict(model.named_parameters()), **buffers}


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


def is_routed_name(name: str) -> bool:
    """The router, its bias or a routed expert: whole on every rank that holds them (no TP split)."""
    return name.endswith((ROUTER, EXPERT_BIAS)) or EXPERTS in name


def is_moe_name(name: str) -> bool:
    return is_routed_name(name) or SHARED in name


def _hf_mlp(rest: str, prefix: str) -> tuple[str, str]:
    """(the HF name prefix of the expert MLP that Megatron tensor `rest` belongs to, its linear's name)."""
    if rest.startswith(SHARED):
        return f"{prefix}mlp.shared_experts.", rest.removeprefix(SHARED)
    expert, linear = rest.removeprefix(EXPERTS).split(".", 1)
    return f"{prefix}mlp.experts.{expert}.", linear


def hf_to_megatron(rest: str, prefix: str, hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The Megatron tensor `rest` of the layer whose HF names start with `prefix`."""
    if rest == ROUTER:
        return hf(prefix + "mlp.gate.weight")
    if rest == EXPERT_BIAS:
        return hf(prefix + "mlp.gate.e_score_correction_bias")
    source, linear = _hf_mlp(rest, prefix)
    if linear == "linear_fc1.weight":
        return torch.cat([hf(source + "gate_proj.weight"), hf(source + "up_proj.weight")])
    return hf(source + "down_proj.weight")


def megatron_to_hf(rest: str, prefix: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors the Megatron tensor `rest` of the layer at `prefix` holds."""
    if rest in (ROUTER, EXPERT_BIAS):
        yield prefix + ("mlp.gate.weight" if rest == ROUTER else "mlp.gate.e_score_correction_bias"), tensor
        return
    target, linear = _hf_mlp(rest, prefix)
    if linear == "linear_fc1.weight":
        gate, up = tensor.chunk(2)
        yield target + "gate_proj.weight", gate
        yield target + "up_proj.weight", up
    else:
        yield target + "down_proj.weight", tensor
