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
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from protos.errors import InvalidArgument, NotFound
from servicekit.paths import user_path

ANVIL_HOME_ENV = "ANVIL_HOME"
BUILD_RECIPE_VERSION = 1
"""Bump when the build below changes, so caches built by older code are not reused."""

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *ROLE_TOKENS)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class BuiltinModelSpec:
    """The recipe of a built-in Llama-architecture model (every field feeds the cache fingerprint)."""

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

    def fingerprint(self) -> str:
        recipe = json.dumps({**asdict(self), "recipe_version": BUILD_RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(recipe.encode()).hexdigest()[:12]


BUILTIN_MODELS: dict[str, BuiltinModelSpec] = {
    # ~1.8 M parameters: fast enough to train with RL on a 2-core CPU.
    "anvil-tiny": BuiltinModelSpec(
        name="anvil-tiny",
        tokenizer_vocab_size=512,
        hidden_size=192,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
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
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
    config = LlamaConfig(
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)


def train_tokenizer(vocab_size: int):  # -> tokenizers.Tokenizer
    """Byte-level BPE with single-digit tokens, trained on `tokenizer_corpus()` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return tokenizer


_WORDS = (
    "the of and to in is it that for on with as was be by at this are from or have an they which one you "
    "were all we when there can an your more if no out so what up its about into than them only other new "
    "some could time these two may then do first any my now such like our over man me even most made after "
    "also did many before must through back years where much way well down should because each just those "
    "people how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against "
    "go came right used take three what is plus minus times reverse copy count letters word answer question "
    "sort upper lower first last sum number digit add subtract multiply zero one two three four five six "
    "seven eight nine ten apple banana cherry river stone cloud light water fire earth green blue red"
).split()


def tokenizer_corpus() -> list[str]:
    """Text the built-in tokenizers are trained on: words, chat turns and arithmetic, from a fixed seed."""
    rng = random.Random(1234)
    lines = []
    for _ in range(4000):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(words)
        lines.append(f"<|user|>What is {a}+{b}?<|end|><|assistant|>{a + b}<|end|>")
        lines.append(f"<|user|>Reverse the word {rng.choice(_WORDS)}.<|end|><|assistant|>")
    return lines
