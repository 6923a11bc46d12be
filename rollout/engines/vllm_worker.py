"""Anvil's methods on vLLM's worker (the `worker_extension_cls` engine argument: vLLM mixes this class into
its Worker), reached with `collective_rpc`: a weight reload that leaves the CPU MoE kernels right.

Why: vLLM 0.32's CPU MoE kernel reads its experts prepacked (`cpu_prepack_moe_weight`, done by
`process_weights_after_loading` at start). On a reload, `UnquantizedFusedMoEMethod._setup_kernel` copies
the new, plain expert weights into that storage and skips the prepack ("the kernel does not need to be
re-built"), so the kernel reads plain bytes as packed: measured max |logprob - transformers| of 5.96 after
reloading the *unchanged* checkpoint of anvil-tiny-moe, 3e-6 with the repack below. Dense layers are not
affected (their reload re-packs). Every Anvil reload is a whole model, so every MoE layer was reloaded and
is repacked once; a layer repacked twice would be corrupt.
"""

from __future__ import annotations

WORKER_EXTENSION = "rollout.engines.vllm_worker.AnvilWorkerExtension"
RELOAD_WEIGHTS_RPC = "anvil_reload_weights"


class AnvilWorkerExtension:
    """Mixed into vLLM's Worker, which provides `reload_weights` and `model_runner`."""

    def anvil_reload_weights(self, weights_path: str) -> int:
        """vLLM's layer-wise reload from a safetensors directory, then the CPU MoE repack; returns the
        number of MoE layers repacked."""
        self.reload_weights(weights_path=weights_path)
        return repack_cpu_moe(self.model_runner.get_model())


def repack_cpu_moe(model) -> int:  # model: torch.nn.Module inside the worker
    """Prepack, in place, the expert weights of every MoE layer that runs on vLLM's CPU experts kernel
    (unquantized; the quantized CPU kernels are not covered and are not used by Anvil's float weights)."""
    import torch
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if not isinstance(experts, CPUUnquantizedExperts) or not hasattr(module, "w13_weight"):
            continue  # not the CPU experts kernel (GPU kernels re-run their own setup on reload)
        if getattr(experts, "_use_zentorch", False):
            continue  # zentorch reads plain weights
        config = experts.moe_config
        if experts._padded_intermediate_size(config) != config.intermediate_size_per_partition:
            raise NotImplementedError(  # the first load pads as well as packs; a reload here would not
                f"moe_intermediate_size {config.intermediate_size_per_partition} per rank is padded by vLLM's "
                "CPU MoE kernel; in-place weight updates of such a model are not supported on this build"
            )
        with torch.no_grad():
            for name in ("w13_weight", "w2_weight"):
                weight = getattr(module, name)
                weight.data.copy_(ops.cpu_prepack_moe_weight(weight.data.clone(), experts.isa))
        repacked += 1
    return repacked
