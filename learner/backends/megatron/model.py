"""Build this rank's Megatron GPTModel from a Hugging Face model directory and load its weights.

The TransformerConfig is derived from config.json (Llama / Qwen2: RMSNorm, SwiGLU, RoPE, GQA, Qwen2's qkv
bias, tied embeddings; Qwen3's q/k norms; Qwen3-MoE's experts; DeepSeek-V3's MLA and router: deepseek.py).
Parameters are created uninitialised (`perform_initialization=False`) and then
filled from the safetensors, one HF tensor at a time, converted to Megatron layout and cut to this TP
rank's slice of this pipeline stage's layers - no rank ever holds more than one full layer tensor beyond
its own shard.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from learner.backends.megatron import convert, convert_moe, cuda_shim, deepseek, schedule
from learner.backends.megatron.model_shape import ModelShape, model_shape, rope_theta
from learner.backends.megatron.parallel import ParallelLayout
from learner.config import MegatronBackendConfig
from protos.errors import FailedPrecondition

RECOMPUTE_EVERY_LAYER = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
"""backend.activation_checkpointing: each layer's input is kept, its insides recomputed in backward."""


def use_transformer_engine(config: MegatronBackendConfig, layout: ParallelLayout, mla: bool = False) -> bool:
    """MLA models always take the local spec: TE's fuses the q/kv latent norms into the up projections,
    under names the converter does not write."""
    installed = importlib.util.find_spec("transformer_engine") is not None
    if config.transformer_engine == "on" and not installed:
        raise FailedPrecondition("backend.transformer_engine='on' but transformer_engine is not installed")
    if mla:
        if config.transformer_engine == "on":
            raise FailedPrecondition("backend.transformer_engine='on' with a DeepSeek-V3 (MLA) model: it runs on "
                                     "megatron's local spec only; use 'auto' or 'off'")  # fmt: skip
        return False
    return config.transformer_engine == "on" or (
        config.transformer_engine == "auto" and installed and layout.device.type == "cuda"
    )


def hf_tensor_reader(model_path: Path) -> Callable[[str], torch.Tensor]:
    """name -> float32 tensor, across single-file or sharded safetensors."""
    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        files = {name: model_path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    else:
        files = {}
        for file in sorted(model_path.glob("*.safetensors")):
            with safe_open(file, "pt") as handle:
                files.update(dict.fromkeys(handle.keys(), file))
    if not files:
        raise FailedPrecondition(f"{model_path} has no safetensors weights")

    def read(name: str) -> torch.Tensor:
        if name not in files:
            raise FailedPrecondition(f"{model_path} has no tensor {name!r}")
        with safe_open(files[name], "pt") as handle:
            return handle.get_tensor(name).float()

    return read


def hf_tensor_shapes(model_path: Path) -> dict[str, list[int]]:
    """Shapes of every tensor in the model directory's safetensors, read from the headers only."""
    shapes: dict[str, list[int]] = {}
    for file in sorted(model_path.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            shapes.update({name: list(handle.get_slice(name).get_shape()) for name in handle.keys()})  # noqa: SIM118
    return shapes


def sequence_parallel(shape: ModelShape, layout: ParallelLayout) -> bool:
    """Megatron's MoE layers train at tp > 1 only with sequence parallelism (each TP rank routes its own slice
    of the sequence); dense models run without it, as before."""
    return bool(shape.num_experts) and layout.tp > 1


def moe_config(hf_config, ep: int, aux_loss_coeff: float) -> dict:
    """TransformerConfig fields for Qwen3-MoE's layers: a softmax router whose top-k probabilities are
    renormalised (Megatron: top-k on the logits, then a softmax over those k: the same numbers), experts run
    one after another (SequentialMLP: no grouped GEMM kernel needed), dropless, the load-balancing loss only
    when asked for (backend.moe_aux_loss_coeff; padding excluded: schedule.py passes the mask). Router in
    fp32, as Hugging Face's softmax. Tokens reach the experts through the all-to-all dispatcher
    (schedule.PIPELINE_CONFIG: the one variable sequence lengths allow)."""
    cuda_shim.install_moe_cpu_fixes()
    deepseek_v3 = hf_config.model_type == "deepseek_v3"
    if deepseek_v3 and aux_loss_coeff > 0:
        raise FailedPrecondition(
            "backend.moe_aux_loss_coeff > 0 with DeepSeek-V3: the load-balancing loss is built for softmax "
            "routers; DeepSeek-V3 balances with its expert bias. Set it to 0"
        )
    fields = {
        "num_moe_experts": convert_moe.num_experts(hf_config),
        "moe_ffn_hidden_size": int(hf_config.moe_intermediate_size),
        "moe_router_topk": int(hf_config.num_experts_per_tok),
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not getattr(hf_config, "norm_topk_prob", True),
        "moe_router_load_balancing_type": "aux_loss" if aux_loss_coeff > 0 else "none",
        "moe_aux_loss_coeff": aux_loss_coeff,
        "moe_grouped_gemm": False,
        "moe_router_dtype": "fp32",
        "expert_model_parallel_size": ep,
        "expert_tensor_parallel_size": 1,  # experts whole on every rank that holds them
        "moe_enable_routing_replay": True,  # inert until a batch carries routes (routing.py)
    }
    return {**fields, **deepseek.router_config(hf_config)} if deepseek_v3 else fields


def build_model(model_path: Path, config: MegatronBackendConfig, layout: ParallelLayout):
    """(GPTModel holding this rank's shard of the HF weights, its ModelShape, the HF config)."""
    from megatron.core.models.gpt import GPTModel, gpt_layer_specs
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_path)
    te = use_transformer_engine(config, layout, mla=hf_config.model_type == "deepseek_v3")
    shape = model_shape(hf_config, layout.tp, config.vocab_multiple, te_names=te, ep=layout.ep)
    fused = config.fused_kernels if config.fused_kernels is not None else layout.device.type == "cuda"
    fields = dict(
        num_layers=shape.num_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_groups,
        kv_channels=shape.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        pipeline_dtype=torch.float32,  # activations between stages travel as fp32 (see schedule.py)
        params_dtype=torch.float32,  # fp32 master weights, as the torch backend; bf16 is autocast compute
        use_cpu_initialization=layout.device.type == "cpu",
        perform_initialization=False,  # every parameter is overwritten from the safetensors below
        bias_activation_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused and te,
        **schedule.PIPELINE_CONFIG,  # micro-batches of varying shape; summed, not averaged, losses
        **(RECOMPUTE_EVERY_LAYER if config.activation_checkpointing else {}),
        **(moe_config(hf_config, layout.ep, config.moe_aux_loss_coeff) if shape.num_experts else {}),
        sequence_parallel=sequence_parallel(shape, layout),
    )
    if shape.mla:
        transformer_config = MLATransformerConfig(**{**fields, **deepseek.mla_config(hf_config)})
    else:
        transformer_config = TransformerConfig(**fields)
    experts = {"num_experts": shape.num_experts, "moe_grouped_gemm": False} if shape.num_experts else {}
    if shape.mla:
        spec = deepseek.layer_specs(transformer_config)
    elif te:
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=shape.qk_norm, **experts)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=shape.qk_norm, **experts)
    names = convert.stage_names(shape, layout.pp_rank, layout.pp, layout.ep_rank, layout.ep)  # num_layers % pp
    if transformer_config.sequence_parallel and layout.pp > 1:
        raise FailedPrecondition(
            f"a Mixture-of-Experts model at tp={layout.tp} with pp={layout.pp}: sequence-parallel pipelines are "
            "not run yet; use pp=1 at tp > 1, or tp=1"
        )
    norms = (
        cuda_shim.torch_norms_under_sequence_parallelism() if transformer_config.sequence_parallel else nullcontext()
    )
    with cuda_shim.tensor_cuda_is_identity(), norms:
        model = GPTModel(
            config=transformer_config,
            transformer_layer_spec=spec,
            vocab_size=shape.padded_vocab_size,
            max_sequence_length=int(getattr(hf_config, "max_position_embeddings", 4096)),
            pre_process=layout.first_stage,
            post_process=layout.last_stage,
            share_embeddings_and_output_weights=shape.tied,
            position_embedding_type="rope",
            rotary_base=int(rope_theta(hf_config)),
        ).to(layout.device)
    load_hf_weights(model, shape, names, hf_tensor_reader(model_path), layout)
    if shape.num_experts:  # megatron lists every RouterReplay globally; routing.py uses each router's own
        from megatron.core.transformer.moe.router_replay import RouterReplay

        RouterReplay.global_router_replay_instances.clear()
    for module in model.modules():
        # In per-token-loss mode a router multiplies its load-balancing loss by the micro-batch's tokens, for
        # Megatron's finalize to divide every gradient by them again; losses here are sums that nothing
        # divides (schedule.py), so the router's term must stay as it is.
        if hasattr(module, "calculate_per_token_loss") and type(module).__name__.endswith("Router"):
            module.calculate_per_token_loss = False
            # DeepSeek-V3's expert bias still steers the routing, but is never updated here, so its token
            # counts are not kept (megatron-core 0.16.1's count also fails on a padding mask: [T, E] & [T]).
            module.enable_expert_bias = False
    return model, shape, hf_config


def load_hf_weights(
    model, shape: ModelShape, names: dict[str, str], read: Callable[[str], torch.Tensor], layout
) -> None:
    """Overwrite every parameter (and expert bias) with its shard of the HF weights; any name left over is an
    error. `names` maps this stage's parameter names to whole-model ones (convert.stage_names)."""
    parameters = convert_moe.model_weights(model)
    expected = set(names)
    if set(parameters) != expected:
        raise FailedPrecondition(
            "megatron model and converter disagree on parameters: "
            f"unexpected {sorted(set(parameters) - expected)[:4]}, missing {sorted(expected - set(parameters))[:4]}"
        )
    with torch.no_grad():
        for name, parameter in parameters.items():
            full = convert.hf_to_megatron(names[name], shape, read)
            part = convert.shard(name, full, layout.tp_rank, layout.tp)
            if part.shape != parameter.shape:
                raise FailedPrecondition(f"{name}: converted shape {tuple(part.shape)} != {tuple(parameter.shape)}")
            parameter.copy_(part)
