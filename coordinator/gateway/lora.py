"""LoRA training clients on the Tinker gateway: opt-in (`GatewayConfig.lora_max_rank`), never in service
mode (its trainer jobs stay full-parameter, as the reference workflow's are).

One form travels everywhere: the learner's own `{"rank", "alpha", "attn", "mlp", "unembed"}` (the
`lora` of a learner state's state.json, learner.backends.lora.LoraSpec), None for full-parameter
training. This module turns Tinker's `lora_config` into it, it into the learner's CreateSession fields
and into Tinker's `is_lora`/`lora_rank`/`train_*` answers, and reads it back from a checkpoint on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coordinator.gateway.bodies import LoraConfig
from protos.anvil.v1 import learner_pb2
from protos.errors import InvalidArgument

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def lora_from_body(config: LoraConfig | None, max_rank: int) -> dict[str, Any] | None:
    """The adapter a `create_model` asks for (None: full parameters), or InvalidArgument saying why not."""
    rank = config.rank if config is not None else 0
    if rank == 0:
        return None
    if max_rank == 0:
        raise InvalidArgument(
            f"LoRA rank {rank} requested, but this server trains full-parameter models only (lora_rank = 0): "
            "pass rank=0, or start anvil serve with lora_max_rank set (service-mode trainers stay full-parameter)"
        )
    if not 0 < rank <= max_rank:
        raise InvalidArgument(f"LoRA rank {rank} is outside 1..{max_rank} (this server's lora_max_rank)")
    if config.alpha is not None and config.alpha <= 0:
        raise InvalidArgument(f"LoRA alpha {config.alpha} must be positive (or left out for the learner's default)")
    lora = {
        "rank": rank,
        "alpha": config.alpha,  # None: the learner's default (learner.backends.lora)
        "attn": config.train_attn,
        "mlp": config.train_mlp,
        "unembed": config.train_unembed,
    }
    if not (lora["attn"] or lora["mlp"] or lora["unembed"]):
        raise InvalidArgument("train_attn, train_mlp and train_unembed are all false: the adapter would train nothing")
    return lora


def session_fields(lora: dict[str, Any] | None) -> dict[str, Any]:
    """The learner CreateSession fields for `lora`."""
    if lora is None:
        return {"lora_rank": 0}
    options = learner_pb2.LoraOptions(
        skip_attn=not lora["attn"],
        skip_mlp=not lora["mlp"],
        skip_unembed=not lora["unembed"],
        alpha=lora["alpha"] or 0.0,  # 0: the learner's default
    )
    return {"lora_rank": lora["rank"], "lora": options}


def tinker_fields(lora: dict[str, Any] | None) -> dict[str, Any]:
    """Tinker's description of a model's (or checkpoint's) adapter, in get_info, training runs, weights_info."""
    if lora is None:
        return {"is_lora": False, "lora_rank": None}
    return {
        "is_lora": True,
        "lora_rank": lora["rank"],
        "train_attn": lora["attn"],
        "train_mlp": lora["mlp"],
        "train_unembed": lora["unembed"],
    }


def lora_of_checkpoint(directory: Path) -> dict[str, Any] | None:
    """The adapter a checkpoint directory holds: a learner state's state.json says; a sampler or exported
    one is a PEFT adapter directory (adapter_config.json) or a full model (None)."""
    state, adapter = directory / "state.json", directory / "adapter_config.json"
    try:
        if state.is_file():
            return json.loads(state.read_text()).get("lora")
        if adapter.is_file():
            config = json.loads(adapter.read_text())
            targets = set(config.get("target_modules") or [])
            return {
                "rank": int(config["r"]),
                "alpha": float(config["lora_alpha"]),
                "attn": bool(targets & set(_ATTN)),
                "mlp": bool(targets & set(_MLP)),
                "unembed": "lm_head" in targets,
            }
    except (OSError, ValueError, KeyError):
        return None
    return None
