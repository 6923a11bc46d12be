"""LoRA adapters as rollout weights: a PEFT adapter directory (what a LoRA learner session's SaveWeights and
publications write) checked against the served model, and merged into base weights for engines without
LoRA support of their own (the torch engine; vLLM serves the adapter itself).

A PEFT name `base_model.model.<module>.lora_A.weight` adapts `<module>.weight`: W = W0 + s * B @ A with
s = alpha / r (alpha / sqrt(r) with rslora), A [r, in] and B [out, r].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from protos.errors import InvalidArgument

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


def is_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_CONFIG).is_file()


def adapter_rank(directory: Path) -> int:
    return int(json.loads((directory / ADAPTER_CONFIG).read_text())["r"])


def read_adapter(directory: Path, served_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Base weight name -> (A, B, scale) for every adapted layer, after checking each against the served
    model (INVALID_ARGUMENT, naming what does not fit, before anything is loaded)."""
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
        tensors = load_file(directory / ADAPTER_WEIGHTS)
    except (OSError, ValueError, KeyError) as exc:
        raise InvalidArgument(f"{directory} is not a readable PEFT LoRA adapter: {exc}") from exc
    if rank <= 0:
        raise InvalidArgument(f"{directory}/{ADAPTER_CONFIG} has rank {rank}; a LoRA adapter's rank is > 0")
    scale = torch.tensor(alpha / (math.sqrt(rank) if config.get("use_rslora") else rank))
    layers: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            if ".lora_B." not in name:
                raise InvalidArgument(f"{directory} holds {name}, which is not a LoRA A or B matrix")
            continue
        module = name.removeprefix(_PREFIX).split(".lora_A.")[0]
        target, b = f"{module}.weight", tensors.get(name.replace(".lora_A.", ".lora_B."))
        shape = served_shapes.get(target)
        if shape is None or b is None:
            raise InvalidArgument(f"{directory} adapts {module}, which the served model lacks (or its B is missing)")
        if (b.shape[0], a.shape[1]) != tuple(shape) or a.shape[0] != rank or b.shape[1] != rank:
            raise InvalidArgument(
                f"{directory}: {module}'s adapter is B {list(b.shape)} @ A {list(a.shape)}, rank {rank}, for a "
                f"served weight of {list(shape)}"
            )
        layers[target] = (a, b, scale)
    if not layers:
        raise InvalidArgument(f"{directory} holds no LoRA layers")
    return layers


def merged(base: dict[str, torch.Tensor], layers: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """The base weights with each adapted layer's W0 + s * B @ A (in float32, then the base's dtype)."""
    weights = dict(base)
    for target, (a, b, scale) in layers.items():
        w0 = base[target]
        weights[target] = (w0.float() + scale * (b.float() @ a.float())).to(w0.dtype)
    return weights
