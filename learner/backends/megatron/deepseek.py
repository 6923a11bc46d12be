"""DeepSeek-V3 (and Kimi K2) on megatron-core's local layer spec: the MLA and router settings of its
TransformerConfig, and the layer specs, with two gaps of megatron-core 0.16.1's local spec filled.

megatron-core builds DeepSeek-V3 from an `MLATransformerConfig`: multi-latent attention (q and kv
low-rank projections, their RMSNorms as q_layernorm / kv_layernorm: `qk_layernorm=True`), the first
`first_k_dense_replace` layers dense (`moe_layer_freq`), then MoE layers whose router scores experts with a
sigmoid, picks the top-k of (score + expert bias) within the best `topk_group` of `n_group` groups, and
weighs the chosen experts by their renormalised scores times `routed_scaling_factor`, beside one shared
expert MLP. The expert bias is DeepSeek's auxiliary-loss-free balancing; Hugging Face does not update it in
training and neither does this learner (`moe_router_bias_update_rate = 0`: it stays the checkpoint's).

Two gaps of the local spec (Transformer Engine's is not used: its fused norm names differ) are filled:

* MLA hands its core attention the key and value widths (`k_channels`, `v_channels`, which differ:
  nope + rope vs v_head_dim), which TE's attention takes and the local `DotProductAttention` does not.
  `LatentDotProductAttention` takes them; with them the local arithmetic is right but for its output width.
* The local spec's down projections are ColumnParallelLinear: their output is split over TP and gathered
  again, and the gather's backward only splits the gradient. The queries' and the kv latent's paths sum
  their gradient over TP later (in the up projections), but the rotary key part of `kv_down_proj` feeds
  every rank's heads directly, so each rank would keep its own heads' share of that gradient only: the
  logprobs are right at tp > 1, the gradients not. `DuplicatedLinear` is what TE's spec uses instead
  (`parallel_mode="duplicated"`): the whole projection on every rank, over its own slice of the sequence
  under sequence parallelism (its weight gradient then partial, tagged `sequence_parallel` and summed over
  TP by the engine, as the norms'), and megatron gathers the rotary key part over the sequence with a
  reduce-scatter in backward, which sums every rank's heads.
"""

from __future__ import annotations

from functools import cache

import torch

from learner.backends.megatron import cuda_shim
from learner.backends.megatron.model_shape import rope_theta


def mla_config(hf_config) -> dict:
    """MLATransformerConfig's attention fields for a DeepSeek-V3 config (default RoPE: model_shape refuses
    scaled ones, so YaRN's factor is 1 and the softmax scale 1/sqrt(nope + rope), as Hugging Face's)."""
    return {
        "q_lora_rank": hf_config.q_lora_rank,
        "kv_lora_rank": int(hf_config.kv_lora_rank),
        "qk_head_dim": int(hf_config.qk_nope_head_dim),
        "qk_pos_emb_head_dim": int(hf_config.qk_rope_head_dim),
        "v_head_dim": int(hf_config.v_head_dim),
        "kv_channels": int(hf_config.v_head_dim),
        "qk_layernorm": True,  # MLA's q_a_layernorm / kv_a_layernorm
        "rope_type": "rope",  # MLATransformerConfig's default is YaRN
        "rotary_base": rope_theta(hf_config),
        "rotary_scaling_factor": 1.0,
        "apply_rope_fusion": False,  # megatron's fused MLA RoPE is YaRN's only
    }


def router_config(hf_config) -> dict:
    """The MoE fields that differ from Qwen3-MoE's softmax router (model.moe_config)."""
    layers = int(hf_config.num_hidden_layers)
    dense = int(hf_config.first_k_dense_replace)
    shared = int(getattr(hf_config, "n_shared_experts", 0) or 0)
    return {
        "moe_layer_freq": [0] * dense + [1] * (layers - dense),
        "moe_router_score_function": "sigmoid",
        "moe_router_pre_softmax": False,
        "moe_router_enable_expert_bias": True,
        "moe_router_bias_update_rate": 0.0,
        "moe_router_num_groups": int(hf_config.n_group) if hf_config.n_group > 1 else None,
        "moe_router_group_topk": int(hf_config.topk_group) if hf_config.n_group > 1 else None,
        "moe_router_topk_scaling_factor": float(hf_config.routed_scaling_factor),
        "moe_shared_expert_intermediate_size": int(hf_config.moe_intermediate_size) * shared or None,
    }


def layer_specs(transformer_config) -> list:
    """Every layer's spec for this pipeline stage (dense or MoE by `moe_layer_freq`), the local spec with
    LatentDotProductAttention as the core attention."""
    from megatron.core.models.gpt import gpt_layer_specs

    cuda_shim.install_mla_local_fixes(duplicated_linear=DuplicatedLinear)
    block = gpt_layer_specs.get_gpt_decoder_block_spec(
        transformer_config, use_transformer_engine=False, normalization="RMSNorm"
    )
    for spec in block.layer_specs:
        attention = spec.submodules.self_attention.submodules
        attention.core_attention = latent_dot_product_attention()
        attention.linear_q_down_proj = attention.linear_kv_down_proj = DuplicatedLinear
    return block


class DuplicatedLinear(torch.nn.Module):
    """A bias-free linear held whole on every TP rank, with megatron's linear interface (`(output, bias)`);
    its weight is created uninitialised (filled from the checkpoint)."""

    def __init__(self, input_size: int, output_size: int, *, config, bias: bool = False, **_megatron_kwargs):
        super().__init__()
        if bias:
            raise ValueError("DuplicatedLinear has no bias (MLA's down projections have none)")
        self.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel  # each rank's gradient: its slice's share

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.nn.functional.linear(hidden, self.weight), None


@cache
def latent_dot_product_attention() -> type:
    """megatron's local DotProductAttention, taking MLA's key and value widths (made on first use, so that
    importing this module does not import megatron)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class LatentDotProductAttention(DotProductAttention):
        """Attention whose keys are k_channels wide and values v_channels wide: the scores need no change
        (MLA passes its own softmax scale), the output is heads x v_channels."""

        def __init__(self, *args, k_channels: int | None = None, v_channels: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None:
                self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition

    return LatentDotProductAttention
