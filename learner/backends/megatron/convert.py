"""Hugging Face Llama/Qwen2/Qwen3(-MoE)/DeepSeek-V3 weights <-> Megatron GPTModel (local or Transformer Engine
spec), per TP rank. DeepSeek-V3's attention is convert_mla.py's, every router and expert convert_moe.py's.

Pure tensor code (no megatron import), so it is testable anywhere. The layouts:

  model.embed_tokens            -> embedding.word_embeddings        rows split over TP (vocab-padded)
  layers.i.input_layernorm      -> decoder.layers.i.input_layernorm (TE: self_attention.linear_qkv.layer_norm_weight)
  q/k/v_proj (+ bias)           -> self_attention.linear_qkv        interleaved per query group [q..., k, v]
  q_norm / k_norm (Qwen3)       -> self_attention.q_layernorm / k_layernorm   replicated ([head_dim])
  o_proj                        -> self_attention.linear_proj       columns split
  post_attention_layernorm      -> decoder.layers.i.pre_mlp_layernorm (TE: mlp.linear_fc1.layer_norm_weight)
  [gate; up]                    -> mlp.linear_fc1                   each rank holds [gate_r; up_r]
  down_proj                     -> mlp.linear_fc2                   columns split
  mlp.gate (Qwen3-MoE router)   -> mlp.router                       replicated ([experts, hidden])
  mlp.experts.e.[gate; up]      -> mlp.experts.local_experts.e.linear_fc1   whole (tp = 1 only)
  mlp.experts.e.down_proj       -> mlp.experts.local_experts.e.linear_fc2   whole
  mlp.shared_experts            -> mlp.shared_experts.linear_fc1 / fc2      split as a dense MLP
  model.norm / lm_head          -> decoder.final_layernorm / output_layer (absent when tied)

Splitting the whole `linear_qkv` by rows gives each rank whole query groups, which is why
num_key_value_heads must be divisible by tp.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from learner.backends.megatron import convert_mla as mla
from learner.backends.megatron import convert_moe as moe
from learner.backends.megatron.model_shape import ModelShape
from protos.errors import FailedPrecondition


def _norm_names(shape: ModelShape, layer: str) -> tuple[str, str]:
    if shape.te_names:
        return layer + "self_attention.linear_qkv.layer_norm_weight", layer + "mlp.linear_fc1.layer_norm_weight"
    return layer + "input_layernorm.weight", layer + "pre_mlp_layernorm.weight"


def megatron_names(shape: ModelShape) -> list[str]:
    """Every Megatron parameter name of the (unsharded) model, in a fixed order."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(shape.num_layers):
        layer = f"decoder.layers.{i}."
        norm_in, norm_mlp = _norm_names(shape, layer)
        if shape.mla:
            names += [norm_in, *mla.layer_names(layer, shape.q_lora)]
        else:
            names += [norm_in, layer + "self_attention.linear_qkv.weight"]
            names += [layer + "self_attention.linear_qkv.bias"] if shape.qkv_bias else []
            names += [layer + f"self_attention.{q}_layernorm.weight" for q in "qk"] if shape.qk_norm else []
        names += [layer + "self_attention.linear_proj.weight", norm_mlp]
        if shape.is_moe_layer(i):
            names += moe.layer_names(layer, shape.num_experts, shape.expert_bias, shape.shared_experts)
        else:
            names += [layer + "mlp.linear_fc1.weight", layer + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    return names if shape.tied else [*names, "output_layer.weight"]


def stage_names(shape: ModelShape, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> dict[str, str]:
    """Pipeline stage `pp_rank`'s parameter names (layers numbered locally, as in named_parameters) ->
    their whole-model names. With tied embeddings and pp > 1 the last stage holds its own copy of the
    embedding as `output_layer.weight` (Megatron keeps the two in sync through their gradients). With
    experts split over `ep` ranks, expert-parallel rank `ep_rank` holds its share, numbered locally."""
    if shape.num_layers % pp:
        raise FailedPrecondition(f"{shape.num_layers} layers cannot be split into pp={pp} equal stages")
    per_stage = shape.num_layers // pp
    first, last = pp_rank == 0, pp_rank == pp - 1
    names: dict[str, str] = {}
    for name in megatron_names(shape):
        if name.startswith("decoder.layers."):
            index, rest = name.removeprefix("decoder.layers.").split(".", 1)
            local = int(index) - pp_rank * per_stage
            rest = moe.local_expert_name(rest, ep_rank, ep, shape.num_experts) if moe.is_moe_name(rest) else rest
            if 0 <= local < per_stage and rest is not None:
                names[f"decoder.layers.{local}.{rest}"] = name
        elif name == "embedding.word_embeddings.weight":
            if first:
                names[name] = name
            if last and shape.tied and pp > 1:
                names["output_layer.weight"] = name
        elif last:
            names[name] = name
    return names


def partition_dim(name: str) -> int | None:
    """The dimension a Megatron parameter is split along over TP ranks; None when it is replicated."""
    if moe.is_routed_name(name):
        return None  # experts are whole per rank (ETP = 1); the router and its bias are replicated
    if mla.splits_rows(name):
        return 0
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_fc1.weight")):
        return 0
    if name.endswith(("linear_qkv.weight", "linear_qkv.bias")):
        return 0
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1
    return None


# --- full (TP=1) tensors --------------------------------------------------------------------------


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def hf_to_megatron(name: str, shape: ModelShape, hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor `name`, read from HF tensors through `hf(hf_name)`."""
    if name == "embedding.word_embeddings.weight":
        return _pad_rows(hf("model.embed_tokens.weight"), shape.padded_vocab_size)
    if name == "output_layer.weight":
        return _pad_rows(hf("lm_head.weight"), shape.padded_vocab_size)
    if name == "decoder.final_layernorm.weight":
        return hf("model.norm.weight")
    index, rest = name.removeprefix("decoder.layers.").split(".", 1)
    prefix = f"model.layers.{index}."
    norm_in, norm_mlp = (n.split(".", 3)[3] for n in _norm_names(shape, f"decoder.layers.{index}."))
    if rest == norm_in:
        return hf(prefix + "input_layernorm.weight")
    if rest == norm_mlp:
        return hf(prefix + "post_attention_layernorm.weight")
    if shape.mla and mla.is_mla_name(rest):
        return mla.hf_to_megatron(rest, prefix, hf)
    if rest.startswith("self_attention.linear_qkv."):
        suffix = rest.rsplit(".", 1)[1]
        g, d = shape.num_groups, shape.head_dim
        q = hf(prefix + f"self_attn.q_proj.{suffix}").reshape(g, shape.heads_per_group * d, -1)
        k = hf(prefix + f"self_attn.k_proj.{suffix}").reshape(g, d, -1)
        v = hf(prefix + f"self_attn.v_proj.{suffix}").reshape(g, d, -1)
        fused = torch.cat([q, k, v], dim=1).reshape(g * (shape.heads_per_group + 2) * d, -1)
        return fused.squeeze(-1) if suffix == "bias" else fused
    if rest in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
        return hf(prefix + f"self_attn.{rest.split('.')[1][0]}_norm.weight")
    if rest == "self_attention.linear_proj.weight":
        return hf(prefix + "self_attn.o_proj.weight")
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([hf(prefix + "mlp.gate_proj.weight"), hf(prefix + "mlp.up_proj.weight")])
    if rest == "mlp.linear_fc2.weight":
        return hf(prefix + "mlp.down_proj.weight")
    if moe.is_moe_name(rest):
        return moe.hf_to_megatron(rest, prefix, hf)
    raise KeyError(f"no Hugging Face source for megatron parameter {name}")


def megatron_to_hf(name: str, tensor: torch.Tensor, shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors held by the full Megatron tensor `name` (vocab padding dropped)."""
    if name == "embedding.word_embeddings.weight":
        yield "model.embed_tokens.weight", tensor[: shape.vocab_size]
        return
    if name == "output_layer.weight":
        yield "lm_head.weight", tensor[: shape.vocab_size]
        return
    if name == "decoder.final_layernorm.weight":
        yield "model.norm.weight", tensor
        return
    index, rest = name.removeprefix("decoder.layers.").split(".", 1)
    prefix = f"model.layers.{index}."
    norm_in, norm_mlp = (n.split(".", 3)[3] for n in _norm_names(shape, f"decoder.layers.{index}."))
    if rest == norm_in:
        yield prefix + "input_layernorm.weight", tensor
    elif rest == norm_mlp:
        yield prefix + "post_attention_layernorm.weight", tensor
    elif shape.mla and mla.is_mla_name(rest):
        yield mla.hf_name(rest, prefix), tensor
    elif rest.startswith("self_attention.linear_qkv."):
        suffix = rest.rsplit(".", 1)[1]
        g, d = shape.num_groups, shape.head_dim
        grouped = tensor.reshape(g, (shape.heads_per_group + 2) * d, -1)
        q, k, v = grouped.split([shape.heads_per_group * d, d, d], dim=1)
        for letter, part in (("q", q), ("k", k), ("v", v)):
            part = part.reshape(-1, part.shape[-1])
            yield prefix + f"self_attn.{letter}_proj.{suffix}", part.squeeze(-1) if suffix == "bias" else part
    elif rest in ("self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"):
        yield prefix + f"self_attn.{rest.split('.')[1][0]}_norm.weight", tensor
    elif rest == "self_attention.linear_proj.weight":
        yield prefix + "self_attn.o_proj.weight", tensor
    elif rest == "mlp.linear_fc1.weight":
        gate, up = tensor.chunk(2)
        yield prefix + "mlp.gate_proj.weight", gate
        yield prefix + "mlp.up_proj.weight", up
    elif rest == "mlp.linear_fc2.weight":
        yield prefix + "mlp.down_proj.weight", tensor
    elif moe.is_moe_name(rest):
        yield from moe.megatron_to_hf(rest, prefix, tensor)
    else:
        raise KeyError(f"no Hugging Face name for megatron parameter {name}")


# --- TP shards ------------------------------------------------------------------------------------


def shard(name: str, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """This TP rank's part of the full Megatron tensor `name`."""
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return full
    if name.endswith("linear_fc1.weight"):  # SwiGLU: rank r holds [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]])
    return full.chunk(tp, dim=dim)[tp_rank]


def unshard(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from every TP rank's part (inverse of `shard`)."""
    dim = partition_dim(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    if name.endswith("linear_fc1.weight"):
        gates, ups = zip(*(part.chunk(2) for part in parts), strict=True)
        return torch.cat([*gates, *ups])
    return torch.cat(parts, dim=dim)


def hf_state_to_megatron_shards(
    hf_state: Mapping[str, torch.Tensor], shape: ModelShape, tp: int
) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's Megatron state from a whole HF state dict (used by tests and tools)."""
    fulls = {name: hf_to_megatron(name, shape, hf_state.__getitem__) for name in megatron_names(shape)}
    return [{name: shard(name, t, rank, tp) for name, t in fulls.items()} for rank in range(tp)]


def megatron_shards_to_hf_state(shards: list[Mapping[str, torch.Tensor]], shape: ModelShape) -> dict[str, torch.Tensor]:
    """The HF state dict from every TP rank's Megatron state (inverse of `hf_state_to_megatron_shards`)."""
    out: dict[str, torch.Tensor] = {}
    for name in megatron_names(shape):
        out.update(megatron_to_hf(name, unshard(name, [s[name] for s in shards]), shape))
    return out
