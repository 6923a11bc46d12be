"""LearnerConfig: the learner process's one typed config (TOML file + `--set` overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from protos.rpc import ServerConfig


class TorchBackendConfig(BaseModel):
    """The plain-PyTorch backend: one device, float32 parameters (bf16 autocast on CUDA)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["torch"] = "torch"
    """Backend selector."""
    device: str = "auto"
    """"auto" (CUDA when present, else CPU), "cpu", or a torch device string such as "cuda:1"."""
    max_tokens_per_micro_batch: int = Field(default=8192, ge=1)
    """A ForwardBackward request runs in packed micro-batches of at most this many tokens (a longer
    sequence alone), gradients accumulated: memory is bounded by this, not by the request's size."""
    logprob_chunk_tokens: int = Field(default=1024, ge=1)
    """Positions whose vocabulary logits exist at once while taking logprobs (bounds the logits' memory)."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward instead of keeping them: less memory, ~1/3 more compute."""
    share_prefixes: bool = True
    """Run identical datums once, and a prefix that consecutive datums share (a GRPO group's prompt) once,
    its keys and values shared by every member (learner/backends/prefix_sharing.py); off: every datum runs
    whole, packed."""


class MegatronBackendConfig(BaseModel):
    """megatron-core GPTModel sharded over torchrun ranks: rank 0 serves gRPC, every rank runs each command.

    Launch with `scripts/megatron_learner.sh` (one node) or `scripts/megatron_learner.slurm` (many); without
    torchrun the learner runs as a world of one. tp * pp * dp must equal the number of ranks.
    """

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    type: Literal["megatron"] = "megatron"
    """Backend selector."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel size: attention heads, MLP and vocabulary are split over this many ranks."""
    pp: int = Field(default=1, ge=1)
    """Pipeline-parallel size: the layers are split into this many consecutive stages (num_layers % pp == 0).
    A request's micro-batches go through megatron-core's 1F1B schedule, so stages work on different
    micro-batches at once: PP divides time as well as memory once there are at least pp micro-batches."""
    max_tokens_per_micro_batch: int = Field(default=8192, ge=1)
    """A request is split, in datum order, into micro-batches of at most this many tokens per DP replica
    (a longer datum goes alone); gradients accumulate over them, so the result equals one whole batch."""
    dp: int | None = Field(default=None, ge=1)
    """Data-parallel size; None derives it as world_size / (tp * pp). Datums are split over DP replicas."""
    ep: int = Field(default=1, ge=1)
    """Expert-parallel size (Mixture-of-Experts models): each group of `ep` ranks (of a stage's tp x dp, TP
    ranks first) splits the experts between them, whole, and tokens travel to their experts' rank and back
    (all-to-all). Must divide tp x dp and the number of experts. At tp > 1 an MoE runs with sequence
    parallelism (each TP rank routes its own slice of the sequence)."""
    moe_aux_loss_coeff: float = Field(default=0.0, ge=0)
    """Mixture-of-Experts load-balancing loss (Switch Transformer's, per layer: E * sum_e f_e * P_e over each
    micro-batch's real tokens, times this), added to the loss being trained; 0 turns it off (the default: RL
    trains the routes the policy takes). Hugging Face's `router_aux_loss_coef` c matches roughly c * k / layers
    (it pools every layer's tokens into one term)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer's activations in backward instead of keeping them (megatron's
    full, uniform recompute, one layer per unit): less memory, about a third more compute."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype. Parameters and AdamW state are always float32 (as in the torch backend); "bfloat16"
    runs the forward under CUDA bf16 autocast. "auto" = bfloat16 on CUDA, float32 on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto" uses CUDA (NCCL, one GPU per local rank) when present, else CPU (gloo) with the CUDA shim."""
    transformer_engine: Literal["auto", "on", "off"] = "auto"
    """Transformer Engine layer spec (fused attention and norms): "auto" uses it on CUDA when installed."""
    fused_kernels: bool | None = None
    """Megatron's fused bias-activation / RoPE / softmax kernels; None enables them on CUDA only."""
    vocab_multiple: int = Field(default=128, ge=1)
    """The embedding and output rows are padded to a multiple of this (independent of tp, so a
    checkpoint saved at one tp loads at another); padded logits are masked out of every softmax."""
    collective_timeout_s: float = Field(default=600.0, gt=0)
    """A collective that waits longer fails on every rank (reported as a status) instead of hanging."""

    @model_validator(mode="after")
    def _check_layout(self) -> MegatronBackendConfig:
        if self.vocab_multiple % self.tp:
            raise ValueError(f"backend.vocab_multiple={self.vocab_multiple} must be a multiple of tp={self.tp}")
        if self.ep > 1 and self.moe_aux_loss_coeff > 0:
            raise ValueError(
                "backend.moe_aux_loss_coeff > 0 with ep > 1 is not supported yet (an EP rank's filler micro-batches "
                "would add a load-balancing term of their own): use ep=1 or no load-balancing loss"
            )
        return self


def _backend_type(value: object) -> str:
    """The union's tag; a backend table without `type` is the torch backend (as before the union)."""
    if isinstance(value, dict):
        return value.get("type", "torch")
    return getattr(value, "type", "torch")


BackendConfig = Annotated[
    Annotated[TorchBackendConfig, Tag("torch")] | Annotated[MegatronBackendConfig, Tag("megatron")],
    Discriminator(_backend_type),
]


class LearnerConfig(BaseModel):
    """Everything the learner process needs; every field has a default so a bare `python -m learner` runs."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    server: ServerConfig = Field(default_factory=ServerConfig)
    """Where the LearnerService listens and its auth."""
    backend: BackendConfig = Field(default_factory=TorchBackendConfig)
    """Model/optimizer backend."""
    models: dict[str, Path] = Field(default_factory=dict)
    """Named base models this learner serves (name -> Hugging Face directory); any directory path works too."""
    allow_lora: bool = False
    """Serve CreateSession with lora_rank > 0 (a PEFT adapter on the frozen base, torch backend). Off by
    default: Anvil trains full parameters, and service-mode trainers refuse LoRA whatever this says."""
    max_sessions: int = Field(default=1, ge=1)
    """Open sessions allowed at once; each holds a full model and AdamW state in memory."""
    checkpoint_dir: Path = Path("runs/learner")
    """Root of SaveState and SaveWeights outputs: <checkpoint_dir>/<session_id>/{state,weights}/<name>."""
    max_batch_rows: int = Field(default=65536, ge=1)
    """Datums one Forward / ForwardBackward request may carry (a bound on what one request decodes;
    memory is bounded by the token-budget micro-batches)."""
    sequence_gap_timeout_s: float = Field(default=120.0, gt=0)
    """How long a request waits for an earlier seq_id before failing with DEADLINE_EXCEEDED."""
    dedup_cache_size: int = Field(default=64, ge=1)
    """Completed requests per session whose results are kept to answer retries without re-executing."""
    weight_deltas: bool = False
    """Keep a host copy of the weights last published by stream, so the next publication sends each piece
    as a lossless delta (xor-zstd) where that is smaller: one model's worth of host memory per session.
    Off by default: after an Adam step a float32 delta is ~0.78 of the raw bytes and compressing it is
    slower than loopback or a fast network (bench/fanout.py: 1.85x the raw publish time); it pays on
    links slower than zstd (~0.4 GB/s a core), e.g. between sites."""
