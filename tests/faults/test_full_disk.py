"""A full disk during a checkpoint write: the learner's checkpoint directory is a small tmpfs (made by
the test, root only). SaveState of a second state does not fit: it fails with RESOURCE_EXHAUSTED naming
the checkpoint and the cause, leaves no partial directory, the first checkpoint still verifies and loads
bit for bit, the live model is untouched, and once space is freed the same save succeeds. A background
save on the full disk answers, and the session's next SaveState reports its failed write."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest
import torch

from learner.checkpoint import verify_checkpoint
from tests.learner.client import random_rows


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def learner_config(learner_config, small_disk):
    learner_config.checkpoint_dir = small_disk / "checkpoints"
    return learner_config


async def test_a_full_disk_fails_the_save_clearly_and_keeps_the_previous_checkpoint(client, small_disk):
    vocab = client.backend.description.vocab_size
    await client.forward_backward(random_rows(vocab, seed=1))
    await client.optim_step(learning_rate=1e-2)
    first = await client.save_state("first", client_state=b"one")
    params = client.parameters_snapshot()
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    filler.write_bytes(b"\0" * max(0, free - 4 * 1024 * 1024))  # leave 4 MiB: less than a state needs

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.save_state("second")
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.details()
    assert "no space left" in message and "second" in message, message
    state_dir = Path(first.path).parent
    assert sorted(p.name for p in state_dir.iterdir()) == ["first"], "no partial checkpoint left behind"
    assert verify_checkpoint(Path(first.path))["step"] == 1
    for name, tensor in client.parameters_snapshot().items():
        assert torch.equal(tensor, params[name]), f"the failed save changed {name}"

    # the learner keeps serving: it trains, and loads the intact checkpoint
    await client.forward_backward(random_rows(vocab, seed=2))
    await client.optim_step(learning_rate=1e-2)
    loaded = await client.load_state(first.path)
    assert loaded.step == 1 and loaded.client_state == b"one"
    for name, tensor in client.parameters_snapshot().items():
        assert torch.equal(tensor, params[name]), name
    # a background save on the full disk answers (its state is copied in memory), but its write fails:
    # the next SaveState says so, once, and the checkpoint never appears
    answered = await client.save_state("background", background=True)
    with pytest.raises(grpc.aio.AioRpcError) as reported:
        await client.save_state("after")
    assert reported.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "the background write of checkpoint 'background' failed: no space left" in reported.value.details()
    assert not Path(answered.path).exists()
    filler.unlink()
    second = await client.save_state("second")
    assert verify_checkpoint(Path(second.path))["step"] == 1
