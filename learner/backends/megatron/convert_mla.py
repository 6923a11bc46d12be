"""The multi-latent attention part of the Hugging Face <-> Megatron conversion (convert.py): DeepSeek-V3's
(and Kimi K2's) attention, as megatron-core's MLASelfAttention names it, under `self_attention.`:

  self_attn.q_a_proj            -> linear_q_down_proj    [q_lora_rank, H]             replicated
  self_attn.q_a_layernorm       -> q_layernorm           [q_lora_rank]                replicated
  self_attn.q_b_proj            -> linear_q_up_proj      [heads * (nope + rope), q_lora_rank]  rows split
  self_attn.q_proj (no q_lora)  -> linear_q_proj         [heads * (nope + rope), H]   rows split
  self_attn.kv_a_proj_with_mqa  -> linear_kv_down_proj   [kv_lora_rank + rope, H]     replicated
  self_attn.kv_a_layernorm      -> kv_layernorm          [kv_lora_rank]               replicated
  self_attn.kv_b_proj           -> linear_kv_up_proj     [heads * (nope + v), kv_lora_rank]    rows split
  self_attn.o_proj              -> linear_proj           (convert.py, as for every model)

Both layouts order each head's rows [no-position part, rotary part] (and [keys, values] in kv_b_proj), so
every tensor is copied as it is. Megatron's MLA rotary embedding reads the rotary part's even then odd
channels, which is Hugging Face's `rope_interleave = True` (DeepSeek-V3's own setting). The down
projections are whole on every TP rank (deepseek.DuplicatedLinear: why), the up projections split by heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

HF_NAMES = {
    "linear_q_down_proj.weight": "q_a_proj.weight",
    "q_layernorm.weight": "q_a_layernorm.weight",
    "linear_q_up_proj.weight": "q_b_proj.weight",
    "linear_q_proj.weight": "q_proj.weight",
    "linear_kv_down_proj.weight": "kv_a_proj_with_mqa.weight",
    "kv_layernorm.weight": "kv_a_layernorm.weight",
    "linear_kv_up_proj.weight": "kv_b_proj.weight",
}
"""Megatron name (after `self_attention.`) -> Hugging Face name (after `self_attn.`)."""
SPLIT_ROWS = ("linear_q_up_proj.weight", "linear_q_proj.weight", "linear_kv_up_proj.weight")


def problems(hf_config) -> list[str]:
    """What this backend cannot do (yet) with a DeepSeek-V3 attention, in words."""
    found = []
    if not getattr(hf_config, "rope_interleave", True):
        found.append("rope_interleave = false (Megatron's MLA rotary embedding reads interleaved channels)")
    return found


def layer_names(layer: str, q_lora: bool) -> list[str]:
    """A layer's MLA parameter names (linear_proj aside) under the layer prefix `layer`."""
    query = ["linear_q_down_proj.weight", "q_layernorm.weight", "linear_q_up_proj.weight"] if q_lora else [
        "linear_q_proj.weight"]  # fmt: skip
    keys_values = ["linear_kv_down_proj.weight", "kv_layernorm.weight", "linear_kv_up_proj.weight"]
    return [f"{layer}self_attention.{name}" for name in query + keys_values]


def is_mla_name(rest: str) -> bool:
    """`rest`: a layer's parameter name after `decoder.layers.i.`."""
    return rest.startswith("self_attention.") and rest.removeprefix("self_attention.") in HF_NAMES


def splits_rows(name: str) -> bool:
    return name.endswith(SPLIT_ROWS)


def hf_name(rest: str, prefix: str) -> str:
    """The Hugging Face name of MLA parameter `rest` in the layer whose HF names start with `prefix`."""
    return f"{prefix}self_attn.{HF_NAMES[rest.removeprefix('self_attention.')]}"


def hf_to_megatron(rest: str, prefix: str, hf: Callable[[str], torch.Tensor]) -> torch.Tensor:
    return hf(hf_name(rest, prefix))
