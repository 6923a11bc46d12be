"""LoRA sessions: a PEFT adapter on a frozen base model, the learner's one exception to full-parameter
training (opt-in: `LearnerConfig.allow_lora`; service-mode trainers never ask for it).

The adapter follows Tinker's options: attention, MLP and unembedding (lm_head) projections, each one
switchable, alpha 32 by default (scale alpha / rank). A is initialised from the session's seed, B at zero,
so a new session computes exactly the base model. Its weights leave the learner as a PEFT adapter
directory (`adapter_config.json` + `adapter_model.safetensors`), the format vLLM's LoRA support and
`peft.PeftModel.from_pretrained` load: rollout replicas take the adapter only, never the base again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from protos.errors import InvalidArgument

DEFAULT_ALPHA = 32.0


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float = DEFAULT_ALPHA
    attn: bool = True
    mlp: bool = True
    unembed: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


def lora_spec(rank: int, options) -> LoraSpec | None:  # options: learner_pb2.LoraOptions
    """The session's adapter from CreateSession's fields; None for full-parameter training (rank 0)."""
    if rank < 0:
        raise InvalidArgument(f"lora_rank={rank} is negative; use 0 (full parameters) or a LoRA rank > 0")
    if rank == 0:
        return None
    if options.alpha < 0:
        raise InvalidArgument(f"lora alpha {options.alpha} is negative; leave it 0 for 32")
    spec = LoraSpec(rank, options.alpha or DEFAULT_ALPHA, not options.skip_attn, not options.skip_mlp,
                    not options.skip_unembed)  # fmt: skip
    if not (spec.attn or spec.mlp or spec.unembed):
        raise InvalidArgument("the LoRA options leave out attention, MLP and unembedding: nothing would train")
    return spec


def target_modules(model: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """The leaf names (q_proj, up_proj, lm_head, ...) of the linear layers the adapter covers, found by
    where they sit (under an attention or an MLP block), so any Hugging Face decoder works."""
    head = model.get_output_embeddings()
    names: set[str] = set()
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        parent, _, leaf = path.rpartition(".")
        in_attn = "attn" in parent or "attention" in parent
        in_mlp = "mlp" in parent or "feed_forward" in parent
        if (in_attn and spec.attn) or (in_mlp and spec.mlp):
            names.add(leaf)
    if spec.unembed and head is not None:
        names.add(next(path for path, module in model.named_modules() if module is head).rpartition(".")[2])
    if not names:
        raise InvalidArgument(f"the model has no linear layers for a LoRA adapter of {spec}")
    return sorted(names)


def with_adapter(model: torch.nn.Module, spec: LoraSpec) -> torch.nn.Module:
    """`model` frozen, with a fresh adapter (drawn from torch's current RNG) on the chosen layers."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        target_modules=target_modules(model, spec),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """What the optimizer steps and a state checkpoint holds: every parameter with requires_grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}
