"""The CUDA compatibility shim that lets megatron-core 0.16.1 run on a CPU-only torch (tests, gloo).

megatron-core assumes CUDA in a few places even for a plain GPTModel (see
reference/megatron-cpu.md §4): its model-parallel RNG tracker saves and restores the *CUDA* RNG state
(attention always forks it, even with dropout 0), RoPE moves `inv_freq` to `torch.cuda.current_device()`,
dist_checkpointing and the pipeline's p2p calls `torch.cuda.synchronize()`, and the forward-backward
schedules count tokens in a `device="cuda"` tensor. This module redirects exactly those to the CPU.

It is installed only when no GPU is present (`install_if_needed`), and nowhere else: on a CUDA machine
megatron runs unpatched. Two gaps of megatron-core without Transformer Engine are filled here too, on any
device: the MoE router's unset `te_general_gemm`, the plain-torch norm under sequence parallelism, and
MLA's belief that Transformer Engine is there. The
backend never uses the code paths that need more (Megatron's own optimizer/DDP stack, which want
`Tensor.type() == 'torch.cuda.FloatTensor'`).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch

_installed = False


def install_if_needed() -> bool:
    """Patch megatron and torch.cuda for a CPU-only process; return whether the shim is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    from megatron.core.tensor_parallel import random as megatron_random

    megatron_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    def add_cpu_rng_state(self, name: str, seed: int) -> None:
        """CudaRNGStatesTracker.add, keeping a CPU generator state instead of a CUDA one."""
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        original = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(original)
        self.seeds_.add(seed)

    megatron_random.CudaRNGStatesTracker.add = add_cpu_rng_state
    torch.cuda.current_device = lambda: "cpu"  # RoPE: inv_freq.to(torch.cuda.current_device())
    torch.cuda.synchronize = lambda *args, **kwargs: None  # dist_checkpointing's preload, p2p shapes

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _TorchWithCudaOnCpu("torch")  # total_num_tokens = torch.zeros(..., device="cuda")
    _installed = True
    return True


class _TorchWithCudaOnCpu(types.ModuleType):
    """`torch` as megatron's schedules module sees it: everything is torch's, except that a tensor
    made with `torch.zeros(..., device="cuda")` is made on the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs) -> torch.Tensor:
        return torch.zeros(*size, device="cpu" if str(device).startswith("cuda") else device, **kwargs)


@contextlib.contextmanager
def tensor_cuda_is_identity() -> Iterator[None]:
    """While active (and only without a GPU), `Tensor.cuda()` returns the tensor itself: GPTModel's
    constructor moves the tied output-layer copy of a pipeline's last stage with `.cuda()`."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def install_moe_cpu_fixes() -> None:
    """Two things megatron-core 0.16.1's MoE layers need besides the shim above.

    Everywhere: its router calls `te_general_gemm` whenever the name is set, but imports it only from
    Transformer Engine and never sets it otherwise (a NameError without TE): None selects the plain matmul.
    On CPU: the all-to-all token dispatcher (the one the schedule's variable sequence lengths allow) copies its
    split sizes to the host on a side CUDA stream; here they are host tensors already, and gloo's
    all_to_all_single wants them as lists, so the copy becomes a plain conversion with no stream."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    if torch.cuda.is_available():
        return
    dispatcher = token_dispatcher.MoEAlltoAllTokenDispatcher
    dispatcher.cuda_dtoh_stream = object()  # set, so the constructor creates no CUDA stream

    def splits_to_host(self, point: str, tokens_per_expert: torch.Tensor | None = None) -> torch.Tensor | None:
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            for name in ("input_splits", "output_splits", "output_splits_tp"):
                value = getattr(self, name)
                if torch.is_tensor(value):
                    setattr(self, name, value.numpy())
        return tokens_per_expert

    dispatcher._maybe_dtoh_and_synchronize = splits_to_host


def install_mla_local_fixes(duplicated_linear: type) -> None:
    """megatron-core's multi-latent attention on the local spec (deepseek.py). It accepts a replicated
    down projection only as TE's `TELinear` or modelopt's `Linear`; `duplicated_linear` becomes the latter.
    And it imports TE's linears through a module that stands in for TE when it is absent, so it believes
    TE is there and checks its layers against TE's stand-in classes; without TE those checks must be off."""
    import importlib.util

    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.Linear = duplicated_linear
    if importlib.util.find_spec("transformer_engine") is None:
        multi_latent_attention.HAVE_TE = False


@contextlib.contextmanager
def torch_norms_under_sequence_parallelism() -> Iterator[None]:
    """megatron-core's plain-torch norm (the local layer spec's, without Apex or TE) refuses sequence
    parallelism, although a norm is per token and so indifferent to how the sequence is split. While this is
    open it builds the norm as without, and tags its weight `sequence_parallel` (each TP rank then holds a
    partial gradient, which the engine sums over the TP group, as Megatron's finalize does)."""
    import copy

    from megatron.core.transformer import torch_norm

    original = torch_norm.WrappedTorchNorm.__new__

    def build(cls, config, hidden_size, eps=1e-5, **kwargs):
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = original(cls, plain, hidden_size, eps, **kwargs)
        for parameter in norm.parameters():
            parameter.sequence_parallel = config.sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = build
    try:
        yield
    finally:
        torch_norm.WrappedTorchNorm.__new__ = original
