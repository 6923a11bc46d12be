"""A served model's tokenizer, put where `AutoTokenizer.from_pretrained(<model name>)` finds it offline.

The tinker SDK's `get_tokenizer()` loads `AutoTokenizer.from_pretrained(<base model name>)` (the sampling
client) or `(<tokenizer_id>)` (the training client): a Hugging Face hub download. A model Anvil serves is
not on the hub (the built-in ones are made in code), so that download fails. Instead the tokenizer's
files (no weights) are written into the local hub cache under the served model's name, in the cache's
documented layout (`models--<name>/snapshots/<revision>/`, `refs/main`), where transformers and
huggingface_hub find them without a network: `anvil serve` does this for clients on its own host, and
`anvil tokenizer --base-url URL` fetches them from a gateway (GET /api/v1/anvil/tokenizer) for clients
elsewhere. The revision is the files' content hash, so re-installing the same tokenizer is a no-op and a
changed one gets a new snapshot.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""What AutoTokenizer reads (config.json: the model type it may consult); never the weights."""


def tokenizer_files(model_dir: Path) -> dict[str, bytes]:
    """The tokenizer files present in a model directory, by name."""
    return {name: (model_dir / name).read_bytes() for name in TOKENIZER_FILES if (model_dir / name).is_file()}


def encode_files(files: dict[str, bytes]) -> dict[str, str]:
    return {name: base64.b64encode(data).decode() for name, data in files.items()}


def decode_files(encoded: dict[str, str]) -> dict[str, bytes]:
    """Files from the gateway's JSON; a name that is not a plain tokenizer file name is refused."""
    unknown = sorted(set(encoded) - set(TOKENIZER_FILES))
    if unknown:
        raise ValueError(f"not tokenizer files: {unknown}")
    return {name: base64.b64decode(data) for name, data in encoded.items()}


def hub_cache_dir() -> Path:
    """huggingface_hub's cache directory (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def install_in_hub_cache(repo_id: str, files: dict[str, bytes], cache_dir: Path | None = None) -> Path:
    """Write `files` as the `main` revision of model `repo_id` in the hub cache; the snapshot directory."""
    if not ({"tokenizer_config.json", "tokenizer.json"} & set(files)):
        raise ValueError(f"no tokenizer among {sorted(files)}")
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    revision = digest.hexdigest()
    repo_dir = (cache_dir or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = snapshot / name
        if not path.is_file() or path.read_bytes() != data:
            partial = path.with_suffix(path.suffix + ".partial")
            partial.write_bytes(data)
            partial.replace(path)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot
