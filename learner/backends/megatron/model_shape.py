"""What the Hugging Face <-> Megatron conversion needs to know of a model (ModelShape), and which models
and layouts it refuses, named in words (FailedPrecondition).

Llama, Qwen2 (qkv bias), Qwen3 (q/k norms), Qwen3-MoE (every layer's MLP routed experts) and DeepSeek-V3
(multi-latent attention, first_k_dense_replace dense layers, then MoE layers of routed experts beside a
shared one under a sigmoid router with an expert bias and grouped top-k). Pure config code: no megatron or
tensor import, so it is testable anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from learner.backends.megatron import convert_mla
from learner.backends.megatron import convert_moe as moe
from protos.errors import FailedPrecondition

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe", "deepseek_v3")


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_groups: int
    head_dim: int
    vocab_size: int
    padded_vocab_size: int
    tied: bool
    qkv_bias: bool
    te_names: bool = False
    """Transformer Engine spec: the two pre-norms are fused into linear_qkv / linear_fc1."""
    qk_norm: bool = False
    """Qwen3: an RMSNorm over head_dim on every query and key head, before RoPE (Megatron's qk_layernorm)."""
    num_experts: int = 0
    """Routed experts in each MoE layer's MLP (0: dense). Megatron's SequentialMLP names them
    local_experts.e; with one expert-parallel rank, local and global expert numbers are the same."""
    mla: bool = False
    """DeepSeek-V3's multi-latent attention (convert_mla.py names its weights)."""
    q_lora: bool = False
    """MLA with a low-rank query (q_lora_rank set): q_a_proj, q_a_layernorm, q_b_proj instead of q_proj."""
    first_dense_layers: int = 0
    """DeepSeek-V3's first_k_dense_replace: that many plain-MLP layers before the MoE ones."""
    shared_experts: bool = False
    """DeepSeek-V3: one always-on expert MLP beside the routed ones (Megatron's shared_experts, TP-split)."""
    expert_bias: bool = False
    """DeepSeek-V3: the router's e_score_correction_bias (Megatron's expert_bias, a buffer: never trained)."""

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_groups

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.num_experts) and layer >= self.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(layer) for layer in range(self.num_layers))

    def moe_layers_of_stage(self, pp_rank: int, pp: int) -> range:
        """The MoE layers of pipeline stage `pp_rank`, numbered among MoE layers only (as routes list them)."""
        per_stage = self.num_layers // pp
        before = sum(self.is_moe_layer(layer) for layer in range(pp_rank * per_stage))
        inside = sum(self.is_moe_layer(layer) for layer in range(pp_rank * per_stage, (pp_rank + 1) * per_stage))
        return range(before, before + inside)


def model_shape(hf_config, tp: int, vocab_multiple: int, te_names: bool = False, ep: int = 1) -> ModelShape:
    """Check that the model is supported at this tp and describe it; FailedPrecondition names what is not."""
    kind = getattr(hf_config, "model_type", "?")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise FailedPrecondition(f"the megatron backend converts {list(SUPPORTED_MODEL_TYPES)} models, not {kind!r}")
    mla = kind == "deepseek_v3"
    problems = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf_config.hidden_act!r} (only silu)")
    if getattr(hf_config, "mlp_bias", False) or (kind != "qwen2" and getattr(hf_config, "attention_bias", False)):
        problems.append("linear biases other than Qwen2's qkv bias")
    if getattr(hf_config, "use_sliding_window", False):
        problems.append("sliding-window attention (Megatron's layers attend over the whole sequence)")
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        problems.append(f"rope scaling {rope.get('rope_type', rope.get('type'))!r}")
    heads = hf_config.num_attention_heads
    groups = heads if mla else hf_config.num_key_value_heads  # MLA: every head its own keys and values
    if groups % tp or heads % tp:
        problems.append(f"{heads} heads / {groups} kv heads are not divisible by tp={tp}")
    problems += moe.problems(hf_config, ep) if kind in ("qwen3_moe", "deepseek_v3") else []
    problems += convert_mla.problems(hf_config) if mla else []
    if problems:
        raise FailedPrecondition(f"cannot shard this {kind} model over megatron: {'; '.join(problems)}")
    vocab = int(hf_config.vocab_size)
    return ModelShape(
        num_layers=hf_config.num_hidden_layers,
        num_heads=heads,
        num_groups=groups,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        vocab_size=vocab,
        padded_vocab_size=-(-vocab // vocab_multiple) * vocab_multiple,
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        te_names=te_names,
        qk_norm=kind in ("qwen3", "qwen3_moe"),
        num_experts=moe.num_experts(hf_config),
        mla=mla,
        q_lora=mla and hf_config.q_lora_rank is not None,
        first_dense_layers=int(getattr(hf_config, "first_k_dense_replace", 0)) if mla else 0,
        shared_experts=mla and bool(getattr(hf_config, "n_shared_experts", 0)),
        expert_bias=mla,
    )


def rope_theta(hf_config) -> float:
    """transformers 5 keeps rope_theta in `rope_parameters`; older configs have it at the top level."""
    parameters = getattr(hf_config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))
