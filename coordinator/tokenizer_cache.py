"""A served model's tokenizer, put where `AutoTokenizer.from_pretrained(<model name>)` finds it offline.

The tinker SDK's `get_tokenizer()` loads `AutoTokenizer.from_pretrained(<base model name>)` (the sampling
client) or `(<tokenizer_id>)` (the training client): a Hugging Face hub download. A model Anvil serves is
not on the hub (the built-in ones are made in code), so that download fails. Instead the tokenizer's
files (no weights) are written into the local hub cache under the served model's name, in the cache's
documented layout (`models--<name>/snapshots/<revision>/`, `refs/main`), where transformers and
huggingface_hub find them without a network: `anvil serve` does this for clients on its own host, and
`anvil tokenizer --server URL` fetches them from a gateway (GET /api/v1/anvil/tokenizer) for clients
elsewhere. The training client's `tokenizer_id` is the served name too (not the server's directory,
which a client on another host does not have).

Hugging Face resolves a hub name over the network first; only offline (`HF_HUB_OFFLINE=1`, or no network:
then after its retries, about two minutes) does it take the cached copy, and on a machine with network a
name that is not on the hub is an error. So clients set HF_HUB_OFFLINE=1, the hub's own switch for models
it must not download - Anvil cannot change what the unmodified SDK asks of transformers. The revision is
the files' content hash, so re-installing the same tokenizer is a no-op and a changed one gets a new
snapshot.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import tempfile
from pathlib import Path

from coordinator.models import BUILTIN_MODELS
from coordinator.server_cli import request, server_arguments

TOKENIZER_ROUTE = "/api/v1/anvil/tokenizer"

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
    """Write `files` as the `main` revision of model `repo_id` in the hub cache; the snapshot directory.

    Refuses (ValueError) to repoint an entry whose current revision holds anything but tokenizer files: that
    is a real model someone downloaded, and a tokenizer-only `main` would hide its weights.
    """
    if not ({"tokenizer_config.json", "tokenizer.json"} & set(files)):
        raise ValueError(f"no tokenizer among {sorted(files)}")
    digest = hashlib.sha1()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    revision = digest.hexdigest()
    repo_dir = (cache_dir or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    main = repo_dir / "refs" / "main"
    if main.is_file():
        current = repo_dir / "snapshots" / main.read_text().strip()
        foreign = sorted(p.name for p in current.iterdir() if p.name not in TOKENIZER_FILES) if current.is_dir() else []
        if foreign:
            raise ValueError(f"the Hugging Face cache already holds a model {repo_id!r} ({', '.join(foreign[:3])}…)")
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        path = snapshot / name
        if not path.is_file() or path.read_bytes() != data:
            with tempfile.NamedTemporaryFile(dir=snapshot, prefix=f".{name}.", delete=False) as partial:
                partial.write(data)
            Path(partial.name).replace(path)  # whole files only, even with two installs at once
    main.parent.mkdir(exist_ok=True)
    main.write_text(revision)
    return snapshot


def is_hub_name(base_model: str) -> bool:
    """Whether `base_model` is a hub-style name (`name` or `org/name`) rather than a directory path."""
    return not Path(base_model).is_absolute() and base_model.count("/") <= 1 and not base_model.startswith(".")


def install_served_tokenizer(base_model: str, model_dir: Path) -> str:
    """`anvil serve`'s start: a built-in model's tokenizer into this host's hub cache; a line saying so.

    Only built-in models: they exist nowhere else. A served Hugging Face directory is its own tokenizer
    (get_tokenizer() on this host loads the path), and its name may well be a real hub model's.
    """
    if base_model not in BUILTIN_MODELS:
        return f"tokenizer: {base_model} is a directory; get_tokenizer() loads it from there on this host"
    try:
        snapshot = install_in_hub_cache(base_model, tokenizer_files(model_dir))
    except (OSError, ValueError) as exc:
        return f"tokenizer: not installed in the Hugging Face cache ({exc})"
    return (
        f"tokenizer: {base_model} installed in the Hugging Face cache ({snapshot}); with HF_HUB_OFFLINE=1 "
        "the SDK's get_tokenizer() loads it"
    )


def add_tokenizer_command(commands: argparse._SubParsersAction) -> None:
    tokenizer = commands.add_parser(
        "tokenizer",
        parents=[server_arguments()],
        help="put the tokenizer a running anvil serve serves into this host's Hugging Face cache",
    )
    tokenizer.set_defaults(handler=_pull)


def _pull(args: argparse.Namespace) -> int:
    answer = request(args, "anvil tokenizer", "GET", TOKENIZER_ROUTE)
    if not is_hub_name(answer["base_model"]):
        raise SystemExit(
            f"anvil tokenizer: the server serves the directory {answer['base_model']}, which get_tokenizer() loads "
            "by path; copy its tokenizer files to the same path here"
        )
    try:
        snapshot = install_in_hub_cache(answer["base_model"], decode_files(answer["files"]))
    except ValueError as exc:
        raise SystemExit(f"anvil tokenizer: {exc}") from None
    print(f"{answer['base_model']}: {snapshot}")
    print("AutoTokenizer.from_pretrained and the tinker SDK's get_tokenizer() load it with HF_HUB_OFFLINE=1")
    return 0
