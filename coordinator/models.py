"""Built-in models, made in code, and the resolution of model names to Hugging Face directories.

Anvil never downloads weights or tokenizers. The built-in names resolve to a Hugging Face model
directory (config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json) built deterministically from a fixed seed and a byte-level BPE tokenizer trained,
in code, on a corpus generated in code. The directory is cached under `$ANVIL_HOME/models` (default
`~/.cache/anvil/models`), named by a fingerprint of its recipe, and written to a temp dir then renamed,
so concurrent builders never see half a model.

Any local Hugging Face model directory (say a downloaded Qwen2.5-0.5B) is accepted wherever a model
name is: `resolve_model("/models/qwen")` returns it unchanged.

Prompt format of the built-in tasks (the tokenizer's chat template renders it):

    <|user|>What is 12+7?<|end|><|assistant|>19<|end|>

`<|end|>` is the EOS token and ends every turn; `<|pad|>` pads; digits are always single tokens
(`Digits(individual_digits=True)` runs before byte-level BPE) so arithmetic is learnable by a tiny model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from coordinator.builtin_tokenizer import (  # noqa: F401 - re-exported: the built-in models' token names
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    train_tokenizer,
)
from protos.errors import InvalidArgument, NotFound
from servicekit.paths import user_path

ANVIL_HOME_ENV = "ANVIL_HOME"
BUILD_RECIPE_VERSION = 1
"""Bump when the build below changes, so caches built by older code are not reused."""


@dataclass(frozen=True)
class BuiltinModelSpec:
    """The recipe of a built-in model (every field feeds the cache fingerprint)."""

    name: str
    tokenizer_vocab_size: int
    """Target size of the trained BPE vocabulary; the model's vocab_size equals the trained size."""
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    """At least 32: vLLM's CPU attention kernels need it."""
    max_position_embeddings: int
    seed: int = 0
    architecture: Literal["llama", "qwen3", "qwen3_moe", "deepseek_v3"] = "llama"
    """Hugging Face model type: Llama, Qwen3 (Llama with q/k RMS norms), Qwen3-MoE (every layer's MLP a
    mixture of `num_experts` experts, `num_experts_per_tok` routed per token) or DeepSeek-V3 (multi-head
    latent attention, a shared expert beside the routed ones, a sigmoid router with grouped top-k)."""
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0

    def fingerprint(self) -> str:
        recipe = {**asdict(self), "recipe_version": BUILD_RECIPE_VERSION}
        for field in fields(self):  # fields added later leave the older models' fingerprints (and caches) alone
            if field.name in _LATER_FIELDS and recipe[field.name] == field.default:
                del recipe[field.name]
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


_LATER_FIELDS = ("architecture", "num_experts", "num_experts_per_tok", "moe_intermediate_size")
DEEPSEEK_V3_TINY = dict(  # MLA and router shape of DeepSeek-V3 / Kimi K2, at anvil-tiny's width
    n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=1.0,
    kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32,
)  # fmt: skip


TINY_SHAPE = dict(
    tokenizer_vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
)  # fmt: skip
"""anvil-tiny's shape, which the other architectures' tiny built-ins share."""
TINY_EXPERTS = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)

BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    # ~1.8 M parameters: fast enough to train with RL on a 2-core CPU.
    "anvil-tiny": BuiltinModelSpec(
        name="anvil-tiny",
        **TINY_SHAPE,
    ),
    # ~27 M parameters: a size where kernels and weight transfer start to matter.
    "anvil-small": BuiltinModelSpec(
        name="anvil-small",
        tokenizer_vocab_size=1024,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=1024,
    ),
    # anvil-tiny's shape as Qwen3 (q/k norms): the dense model of the Qwen3 family's architecture.
    "anvil-tiny-qwen3": BuiltinModelSpec(
        name="anvil-tiny-qwen3",
        **TINY_SHAPE,
        architecture="qwen3",
    ),
    # anvil-tiny's shape as Qwen3-MoE: 8 experts of 128 per layer, top-2 routed (~3.0 M parameters, ~1.2 M
    # active per token), the architecture of Qwen3-30B-A3B / 235B-A22B.
    "anvil-tiny-moe": BuiltinModelSpec(
        name="anvil-tiny-moe",
        **TINY_SHAPE,
        architecture="qwen3_moe",
        **TINY_EXPERTS,
    ),
    # DeepSeek-V3's architecture (the reference workflow's Kimi K2.5 is one) at anvil-tiny's width: MLA, one
    # dense layer then MoE layers of 8 routed experts (top-2 of 2 groups) and a shared one. The torch
    # learner and engine run it (~3.0 M parameters, ~1.7 M active); vLLM's CPU build does not (its CPU MLA
    # attention: docs/architecture.md).
    "anvil-tiny-deepseek": BuiltinModelSpec(
        name="anvil-tiny-deepseek",
        **{**TINY_SHAPE, "num_key_value_heads": 6},  # MLA: every head its own keys; head_dim = qk_rope_head_dim
        architecture="deepseek_v3",
        **TINY_EXPERTS,
    ),
}


def anvil_home() -> Path:
    return Path(os.environ.get(ANVIL_HOME_ENV) or Path.home() / ".cache" / "anvil")


ACCOUNT_MODEL = re.compile(r"^accounts/[^/]+/models/(?P<name>[^/]+)$")
"""Fireworks' form of a model name (the reference workflow's `accounts/fireworks/models/<name>`)."""


def model_name_of(base_model: str) -> str:
    """The model a request's `base_model` names: `anvil-tiny`, `accounts/<account>/models/anvil-tiny` and
    `anvil-tiny:<tag>` all name the built-in anvil-tiny; a local directory names itself. Every route that
    takes a base model (deployments, trainer jobs, the Tinker layer, sampling) goes through this."""
    if not base_model:
        raise InvalidArgument("base_model is empty; name the model to serve or train (e.g. anvil-tiny)")
    match = ACCOUNT_MODEL.match(base_model)
    name = match.group("name") if match else base_model
    return name if user_path(name).is_dir() else name.split(":")[0]


def same_model(base_model: str, served: str, served_dir: Path) -> bool:
    """Whether `base_model`, in any accepted form, names the model served as `served` from `served_dir`."""
    name = model_name_of(base_model)
    if name in (model_name_of(served), str(served_dir)):
        return True
    path = user_path(name)
    return path.is_dir() and path.resolve() == served_dir.resolve()


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """Map a built-in name (in any form model_name_of accepts) or a local Hugging Face directory to a
    model directory, building a built-in one if needed."""
    name_or_path = model_name_of(name_or_path)
    if name_or_path in BUILTIN_MODELS:
        return ensure_builtin_model(BUILTIN_MODELS[name_or_path], cache_dir)
    path = user_path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotFound(f"model directory {path} has no config.json; point at a Hugging Face model directory")
        return path.resolve()
    raise NotFound(
        f"unknown model {name_or_path!r}: use a built-in name ({', '.join(BUILTIN_MODELS)}) "
        "or the path of a local Hugging Face model directory"
    )


def ensure_builtin_model(spec: BuiltinModelSpec, cache_dir: Path | None = None) -> Path:
    """Return the cached directory of `spec`, building it first if it is not there."""
    root = (cache_dir or anvil_home() / "models").expanduser()
    target = root / f"{spec.name}-{spec.fingerprint()}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=root))
    try:
        build_model_directory(spec, staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_model_directory(spec: BuiltinModelSpec, out_dir: Path) -> None:
    """Write tokenizer, config and seeded random weights of `spec` into out_dir (no network)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(spec.tokenizer_vocab_size),
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=spec.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(out_dir)
    config = model_config(spec, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)


def model_config(spec: BuiltinModelSpec, tokenizer):  # -> transformers.PretrainedConfig
    """The transformers config of `spec`'s architecture, sized to the trained tokenizer."""
    from transformers import DeepseekV3Config, LlamaConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        torch_dtype="float32",
    )
    if spec.architecture == "qwen3":
        return Qwen3Config(**common)
    if spec.architecture == "qwen3_moe":
        return Qwen3MoeConfig(
            **common, num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
            moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=True, decoder_sparse_step=1,
        )  # fmt: skip
    if spec.architecture == "deepseek_v3":
        return DeepseekV3Config(
            **common, n_routed_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
            moe_intermediate_size=spec.moe_intermediate_size, **DEEPSEEK_V3_TINY,
        )  # fmt: skip
    return LlamaConfig(**common)
