"""The HF <-> Megatron converter on its own (no megatron import, no processes): exact round trips at
several TP sizes, and the fused layouts checked against an index-by-index construction."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, LlamaConfig, Qwen2Config, Qwen3MoeConfig

from learner.backends.megatron import convert
from learner.backends.megatron.model_shape import model_shape
from protos.errors import FailedPrecondition


def llama_config(**overrides) -> LlamaConfig:
    fields = dict(vocab_size=200, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})


def random_state(model) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {name: torch.randn_like(p) for name, p in model.named_parameters()}


@pytest.fixture(params=["llama", "qwen2-tied", "qwen3-qk-norm"])
def hf(request):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    if request.param == "llama":
        config = llama_config()
        return config, random_state(LlamaForCausalLM(config))
    if request.param == "qwen3-qk-norm":
        config = Qwen3Config(vocab_size=130, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
        return config, random_state(Qwen3ForCausalLM(config))
    config = Qwen2Config(vocab_size=130, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return config, random_state(Qwen2ForCausalLM(config))


@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_is_exact(hf, tp):
    config, state = hf
    shape = model_shape(config, tp, vocab_multiple=64)
    shards = convert.hf_state_to_megatron_shards(state, shape, tp)
    assert all(set(s) == set(convert.megatron_names(shape)) for s in shards)
    back = convert.megatron_shards_to_hf_state(shards, shape)
    expected = {k: v for k, v in state.items() if not (shape.tied and k == "lm_head.weight")}
    assert set(back) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


def test_tp_shards_hold_whole_query_groups_and_gate_up_halves():
    config = llama_config()
    state = random_state(__import__("transformers").LlamaForCausalLM(config))
    shape = model_shape(config, 2, vocab_multiple=64)
    shards = convert.hf_state_to_megatron_shards(state, shape, 2)
    d, per_group = 8, 3  # head_dim, query heads per kv group
    q, k, v = (state[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    for rank in range(2):  # one kv group per rank: [its 3 query heads, its k head, its v head]
        g = rank
        rows = [q[(g * per_group + h) * d : (g * per_group + h + 1) * d] for h in range(per_group)]
        expected = torch.cat([*rows, k[g * d : (g + 1) * d], v[g * d : (g + 1) * d]])
        assert torch.equal(shards[rank]["decoder.layers.1.self_attention.linear_qkv.weight"], expected)
        gate, up = state["model.layers.1.mlp.gate_proj.weight"], state["model.layers.1.mlp.up_proj.weight"]
        half = gate.shape[0] // 2
        fc1 = torch.cat([gate[rank * half : (rank + 1) * half], up[rank * half : (rank + 1) * half]])
        assert torch.equal(shards[rank]["decoder.layers.1.mlp.linear_fc1.weight"], fc1)
        proj = state["model.layers.1.self_attn.o_proj.weight"]
        assert torch.equal(shards[rank]["decoder.layers.1.self_attention.linear_proj.weight"], proj.chunk(2, 1)[rank])
    embedding = torch.cat([s["embedding.word_embeddings.weight"] for s in shards])
    assert embedding.shape[0] == 256 and torch.equal(embedding[:200], state["model.embed_tokens.weight"])
    assert not embedding[200:].any(), "vocabulary padding rows start at zero"


def test_te_spec_names_the_fused_norms():
    shape = model_shape(llama_config(), 1, vocab_multiple=8, te_names=True)
    names = convert.megatron_names(shape)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in names
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in names
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in names)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 1e4,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def test_mixture_of_experts_round_trip_is_exact(tmp_path):
    """Qwen3-MoE by checkpoint name (one tensor per expert, as model.safetensors holds them): the router and
    each expert's [gate; up] and down projections, exactly back."""
    from safetensors.torch import load_file
    from transformers import Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=130, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8)  # fmt: skip
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    shape = model_shape(config, 1, vocab_multiple=64)
    (shard,) = convert.hf_state_to_megatron_shards(state, shape, 1)
    assert torch.equal(shard["decoder.layers.1.mlp.router.weight"], state["model.layers.1.mlp.gate.weight"])
    fc1 = shard["decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight"]
    assert torch.equal(fc1[:16], state["model.layers.0.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(fc1[16:], state["model.layers.0.mlp.experts.3.up_proj.weight"])
    with pytest.raises(FailedPrecondition, match="4 experts cannot be split evenly over ep=3"):
        model_shape(config, 1, vocab_multiple=64, ep=3)
    assert model_shape(llama_config(), 1, vocab_multiple=64, ep=2).num_experts == 0, "ep leaves dense ones be"
    back = convert.megatron_shards_to_hf_state([shard], shape)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def deepseek_config(**overrides) -> DeepseekV3Config:
    fields = dict(vocab_size=130, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                  n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                  first_k_dense_replace=1, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)  # fmt: skip
    return DeepseekV3Config(**{**fields, **overrides})


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_deepseek_round_trip_is_exact(tmp_path, q_lora_rank):
    """DeepSeek-V3 by checkpoint name at TP2: MLA's projections and latent norms (the down projections
    whole on both ranks, the up projections split by heads), the dense first layer, the router and its bias,
    routed and shared experts; exactly back. Without q_lora the query is one projection."""
    from safetensors.torch import load_file
    from transformers import DeepseekV3ForCausalLM

    config = deepseek_config(q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    shape = model_shape(config, 2, vocab_multiple=64)
    assert (shape.mla, shape.q_lora, shape.first_dense_layers, shape.num_moe_layers) == (True, bool(q_lora_rank), 1, 1)
    shards = convert.hf_state_to_megatron_shards(state, shape, 2)
    layer = "decoder.layers.1."
    kv_down = state["model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    assert all(torch.equal(s[layer + "self_attention.linear_kv_down_proj.weight"], kv_down) for s in shards)
    kv_up = state["model.layers.1.self_attn.kv_b_proj.weight"]  # 4 heads x (nope 8 + v 8) rows
    assert torch.equal(shards[1][layer + "self_attention.linear_kv_up_proj.weight"], kv_up[32:])
    bias = state["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(shards[0][layer + "mlp.router.expert_bias"], bias)
    shared = state["model.layers.1.mlp.shared_experts.gate_proj.weight"]  # 16 rows: 8 per rank
    assert torch.equal(shards[1][layer + "mlp.shared_experts.linear_fc1.weight"][:8], shared[8:])
    assert "decoder.layers.0.mlp.router.weight" not in shards[0], "the first layer is dense"
    back = convert.megatron_shards_to_hf_state(shards, shape)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize(
    ("config", "tp", "message"),
    [
        (llama_config(rope_parameters=LLAMA3_ROPE), 1, "rope scaling"),
        (llama_config(), 4, "not divisible by tp=4"),
        (llama_config(hidden_act="gelu"), 1, "hidden_act"),
        (llama_config(attention_bias=True), 1, "biases"),
        (Qwen3MoeConfig(num_attention_heads=4, num_key_value_heads=2, mlp_only_layers=[0]), 1, "dense layers"),
        (Qwen2Config(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True), 1, "sliding-window"),
        (deepseek_config(norm_topk_prob=False), 1, "norm_topk_prob"),
        (deepseek_config(num_experts_per_tok=3), 1, "grouped top-k"),
        (deepseek_config(rope_interleave=False), 1, "rope_interleave"),
        (deepseek_config(), 3, "not divisible by tp=3"),
    ],
    ids=[
        "llama3-rope",
        "kv-heads-vs-tp",
        "gelu",
        "llama-bias",
        "moe-dense-layers",
        "sliding-window",
        "deepseek-unnormalised-top-k",
        "deepseek-top-k-per-group",
        "deepseek-half-rotary",
        "deepseek-heads-vs-tp",
    ],
)
def test_unsupported_models_are_refused_by_name(config, tp, message):
    with pytest.raises(FailedPrecondition, match=message):
        model_shape(config, tp, vocab_multiple=128)


def test_pipeline_stages_split_layers_and_keep_a_tied_copy_on_the_last_stage():
    shape = model_shape(llama_config(num_hidden_layers=4, tie_word_embeddings=True), 1, vocab_multiple=64)
    first, last = convert.stage_names(shape, 0, 2), convert.stage_names(shape, 1, 2)
    assert first["embedding.word_embeddings.weight"] == "embedding.word_embeddings.weight"
    assert first["decoder.layers.1.mlp.linear_fc2.weight"] == "decoder.layers.1.mlp.linear_fc2.weight"
    assert last["decoder.layers.0.mlp.linear_fc2.weight"] == "decoder.layers.2.mlp.linear_fc2.weight"
    assert last["output_layer.weight"] == "embedding.word_embeddings.weight"  # tied: the last stage's copy
    assert "decoder.final_layernorm.weight" in last and "decoder.final_layernorm.weight" not in first
    assert sorted({*first.values(), *last.values()}) == sorted(convert.megatron_names(shape))
    with pytest.raises(FailedPrecondition, match="pp=3"):
        convert.stage_names(shape, 0, 3)
