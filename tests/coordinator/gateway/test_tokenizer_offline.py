"""The official SDK's get_tokenizer() for a served model, without a hub download: on a host with an empty
Hugging Face cache it fails; after `anvil tokenizer --server URL` it loads, for the training client and the
sampling client alike, the very tokenizer the server serves (same ids, same chat template)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from coordinator.tokenizer_cache import decode_files, install_in_hub_cache, tokenizer_files
from tests.coordinator.gateway.conftest import TINKER_KEY

pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")

TEXT = "Reverse 4 1 9"
CLIENT = """
import json, sys, tinker
client = tinker.ServiceClient(base_url=sys.argv[1], api_key=sys.argv[2])
training = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
sampling = client.create_sampling_client(base_model="anvil-tiny").result()
out = {}
for name, tokenizer in (("training", training.get_tokenizer()), ("sampling", sampling.get_tokenizer())):
    chat = tokenizer.apply_chat_template([{"role": "user", "content": sys.argv[3]}], tokenize=False)
    out[name] = {"ids": tokenizer.encode(sys.argv[3], add_special_tokens=False), "chat": chat}
print(json.dumps(out))
"""


def client_host_env(tmp_path: Path) -> dict[str, str]:
    """Another host's environment: an empty hub cache, offline (HF's own switch), no Anvil model cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HF_HOME", "ANVIL_HOME")}
    return {**env, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "ANVIL_HOME": str(tmp_path / "anvil")}


def test_get_tokenizer_works_offline_after_anvil_tokenizer(stack, tiny_model_dir, tmp_path):
    env = client_host_env(tmp_path)
    client = [sys.executable, "-c", CLIENT, stack.base_url, TINKER_KEY, TEXT]
    before = subprocess.run(client, env=env, capture_output=True, text=True, timeout=300)
    assert before.returncode != 0, "an empty cache must not load a tokenizer: the test could not fail otherwise"
    assert "LocalEntryNotFoundError" in before.stderr or "cached files" in before.stderr, before.stderr[-2000:]

    anvil = str(Path(sys.executable).parent / "anvil")
    pulled = subprocess.run([anvil, "tokenizer", "--server", stack.base_url, "--api-key", TINKER_KEY],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert "anvil-tiny" in pulled.stdout

    after = subprocess.run(client, env=env, capture_output=True, text=True, timeout=300)
    assert after.returncode == 0, after.stderr[-3000:]
    loaded = json.loads(after.stdout.strip().splitlines()[-1])
    served = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = {
        "ids": served.encode(TEXT, add_special_tokens=False),
        "chat": served.apply_chat_template([{"role": "user", "content": TEXT}], tokenize=False),
    }
    assert loaded == {"training": expected, "sampling": expected}


def test_the_cache_install_is_idempotent_and_takes_only_tokenizer_files(tiny_model_dir, tmp_path):
    files = tokenizer_files(tiny_model_dir)
    assert "tokenizer.json" in files and "model.safetensors" not in files
    first = install_in_hub_cache("anvil-tiny", files, tmp_path)
    assert install_in_hub_cache("anvil-tiny", files, tmp_path) == first
    assert (tmp_path / "models--anvil-tiny" / "refs" / "main").read_text() == first.name
    with pytest.raises(ValueError, match="not tokenizer files"):
        decode_files({"../../etc/passwd": ""})
    with pytest.raises(ValueError, match="no tokenizer"):
        install_in_hub_cache("anvil-tiny", {"config.json": b"{}"}, tmp_path)
    real = tmp_path / "models--org--real" / "snapshots" / "abc"
    real.mkdir(parents=True)
    (real / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "models--org--real" / "refs").mkdir()
    (tmp_path / "models--org--real" / "refs" / "main").write_text("abc")
    with pytest.raises(ValueError, match="already holds a model 'org/real'"):
        install_in_hub_cache("org/real", files, tmp_path)
    assert (tmp_path / "models--org--real" / "refs" / "main").read_text() == "abc", "a real model is left alone"
