"""Checkpoints over the wire: bit-identical SaveState/LoadState, SaveWeights for transformers, failures
that leave the live model untouched."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.learner.client import random_rows


def optimizer_state(client) -> dict:
    state = client.backend.optimizer.state_dict()["state"]
    return {index: {k: v.clone() for k, v in entry.items()} for index, entry in state.items()}


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_identical(a[key], b[key])
        else:
            assert torch.equal(a[key], b[key]), key


async def train(client, steps: int, seed: int) -> None:
    vocab = client.backend.description.vocab_size
    for step in range(steps):
        await client.forward_backward(random_rows(vocab, seed=seed + step))
        await client.optim_step(learning_rate=1e-2, weight_decay=0.01)


async def test_a_background_save_holds_the_state_of_its_moment_while_training_goes_on(client):
    await train(client, steps=2, seed=0)
    params, adam = client.parameters_snapshot(), optimizer_state(client)
    saved = await client.save_state("background", client_state=b"cursor", background=True)
    assert saved.step == 2
    await train(client, steps=2, seed=10)  # at once: the files are still being written, or just were
    assert not torch.equal(client.parameters_snapshot()["lm_head.weight"], params["lm_head.weight"])
    loaded = await client.load_state(saved.path, with_optimizer=True)  # waits for the write if need be
    assert loaded.step == 2 and loaded.client_state == b"cursor"
    assert_identical(client.parameters_snapshot(), params)
    assert_identical(optimizer_state(client), adam)


async def test_save_then_load_restores_bit_identical_model_and_optimizer(client):
    await train(client, steps=2, seed=0)
    saved = await client.save_state("after-2", client_state=b'{"cursor": 17}')
    assert saved.step == 2
    params, adam = client.parameters_snapshot(), optimizer_state(client)

    await train(client, steps=2, seed=10)
    assert client.backend.step == 4
    assert not torch.equal(client.parameters_snapshot()["lm_head.weight"], params["lm_head.weight"])

    loaded = await client.load_state(saved.path, with_optimizer=True)
    assert loaded.step == 2
    assert loaded.client_state == b'{"cursor": 17}'
    assert_identical(client.parameters_snapshot(), params)
    assert_identical(optimizer_state(client), adam)

    # Continuing from the restored state repeats the original continuation exactly.
    await train(client, steps=1, seed=10)
    continued = client.parameters_snapshot()
    await client.load_state(saved.path, with_optimizer=True)
    await train(client, steps=1, seed=10)
    assert_identical(client.parameters_snapshot(), continued)


async def test_load_without_optimizer_resets_adam_state(client):
    await train(client, steps=1, seed=0)
    saved = await client.save_state("one")
    await client.load_state(saved.path, with_optimizer=False)
    assert client.backend.optimizer.state_dict()["state"] == {}
    assert client.backend.step == 1


async def test_checkpoint_is_complete_with_manifest(client):
    saved = await client.save_state("ckpt")
    directory = Path(saved.path)
    assert (directory / "COMPLETE").is_file()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert {"model.safetensors", "optimizer.pt", "state.json", "client_state.bin"} <= set(manifest["files"])
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")], "temp dirs must not remain"


async def test_save_weights_loads_in_transformers_with_identical_logits(client):
    await train(client, steps=2, seed=5)
    reply = await client.save_weights("for-sampler")
    assert reply.version == 2
    loaded = AutoModelForCausalLM.from_pretrained(reply.path, local_files_only=True, dtype=torch.float32).eval()
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        expected = client.model(input_ids=tokens).logits
        got = loaded(input_ids=tokens).logits
    assert torch.equal(got, expected)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(reply.path).eos_token == "<|end|>"


async def test_existing_name_needs_overwrite(client):
    await client.save_state("same")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.save_state("same")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    await train(client, steps=1, seed=0)
    replaced = await client.save_state("same", overwrite=True)
    assert replaced.step == 1


@pytest.mark.parametrize("name", ["a/b", "", "..", ".hidden"])
async def test_bad_checkpoint_names_are_invalid(client, name):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.save_state(name)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "path segment" in info.value.details()


async def test_unknown_checkpoint_is_not_found_and_model_untouched(client, tmp_path):
    before = client.parameters_snapshot()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.load_state(str(tmp_path / "nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no checkpoint at" in info.value.details()
    assert_identical(client.parameters_snapshot(), before)


async def test_incomplete_checkpoint_is_refused(client):
    saved = await client.save_state("partial")
    (Path(saved.path) / "COMPLETE").unlink()
    await train(client, steps=1, seed=0)
    before, adam = client.parameters_snapshot(), optimizer_state(client)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.load_state(saved.path)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "incomplete" in info.value.details()
    assert_identical(client.parameters_snapshot(), before)
    assert_identical(optimizer_state(client), adam)
    assert client.backend.step == 1


async def test_corrupted_checkpoint_is_refused(client):
    saved = await client.save_state("corrupt")
    weights = Path(saved.path) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF
    weights.write_bytes(bytes(data))
    await train(client, steps=1, seed=0)
    before = client.parameters_snapshot()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.load_state(saved.path)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not match its manifest" in info.value.details()
    assert_identical(client.parameters_snapshot(), before)


async def test_weights_checkpoint_is_not_a_training_state(client):
    weights = await client.save_weights("w")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.load_state(weights.path)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not a training state" in info.value.details()
