"""Built-in models: built offline and deterministically, loadable by transformers, cached, resolvable."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.models import BUILTIN_MODELS, EOS_TOKEN, ensure_builtin_model, model_name_of, resolve_model, same_model
from protos.errors import InvalidArgument, NotFound


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_model_directory_has_weights_config_and_tokenizer(tiny_model_dir: Path):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_tiny_model_loads_offline_and_runs_a_forward_pass(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    config = model.config
    assert config.model_type == "llama"
    assert config.head_dim >= 32, "vLLM's CPU attention kernels need head_dim >= 32"
    assert 100 <= config.vocab_size <= 1000
    num_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= num_params <= 3_000_000

    ids = tokenizer("What is 12+7?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    # The logits are the LM head applied to the final hidden states.
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        torch.testing.assert_close(model.lm_head(hidden), logits)


def test_chat_format_and_single_digit_tokens(tiny_model_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12+7?"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>What is 12+7?<|end|><|assistant|>"
    assert tokenizer.eos_token == EOS_TOKEN
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens[0] == "<|user|>" and tokens[-2:] == ["<|end|>", "<|assistant|>"]
    assert "1" in tokens and "2" in tokens and "12" not in tokens  # digits are single tokens
    assert tokenizer.decode(ids) == text


def test_build_is_deterministic_across_processes(tmp_path: Path, tiny_model_dir: Path):
    """A fresh process (different hash seed) building into another cache makes identical bytes."""
    other_cache = tmp_path / "cache"
    code = (
        "import sys; from pathlib import Path; from coordinator.models import resolve_model; "
        "print(resolve_model('anvil-tiny', Path(sys.argv[1])))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(other_cache)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    rebuilt = Path(result.stdout.strip().splitlines()[-1])
    assert rebuilt != tiny_model_dir
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256(rebuilt / name) == sha256(tiny_model_dir / name), name


def test_cache_is_reused(tiny_model_dir: Path):
    before = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("anvil-tiny") == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_older_built_ins_keep_their_fingerprints():
    """Fields added to the recipe later (architecture, experts) leave the older models' caches valid."""
    assert BUILTIN_MODELS["anvil-tiny"].fingerprint() == "68f5c75a1408"
    assert BUILTIN_MODELS["anvil-small"].fingerprint() == "29c79c207ee5"


def test_cache_dir_is_named_by_recipe_fingerprint(tiny_model_dir: Path):
    spec = BUILTIN_MODELS["anvil-tiny"]
    assert tiny_model_dir.name == f"anvil-tiny-{spec.fingerprint()}"
    changed = type(spec)(**{**spec.__dict__, "seed": 1})
    assert changed.fingerprint() != spec.fingerprint()


def test_small_model_size(tmp_path: Path):
    directory = ensure_builtin_model(BUILTIN_MODELS["anvil-small"], tmp_path)
    config = json.loads((directory / "config.json").read_text())
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        num_params = sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())  # noqa: SIM118
    assert 20_000_000 <= num_params <= 50_000_000
    assert config["head_dim"] >= 32


def test_local_directory_is_accepted_as_a_model_name(tiny_model_dir: Path):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_unknown_names_and_non_model_directories_are_not_found(tmp_path: Path):
    with pytest.raises(NotFound, match=r"unknown model 'anvil-huge'.*anvil-tiny"):
        resolve_model("anvil-huge")
    with pytest.raises(NotFound, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_every_form_of_a_model_name_resolves_to_the_same_model(tmp_path):
    served = resolve_model("anvil-tiny")
    for form in ("anvil-tiny", "accounts/fireworks/models/anvil-tiny", "accounts/me/models/anvil-tiny",
                 "anvil-tiny:v2", str(served)):  # fmt: skip
        assert same_model(form, "anvil-tiny", served), form
        assert resolve_model(form) == served, form
    assert model_name_of("accounts/fireworks/models/anvil-tiny") == "anvil-tiny"
    for other in ("anvil-small", "accounts/fireworks/models/llama-v3", "Qwen/anvil-tiny", str(tmp_path)):
        assert not same_model(other, "anvil-tiny", served), other
    with pytest.raises(InvalidArgument, match="base_model is empty"):
        model_name_of("")
