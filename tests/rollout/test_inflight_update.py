"""In-flight weight updates on real rollout servers: a commit during a long generation returns while the
generation runs on, and every token names the version that produced it (old before the swap, new after).
With `engine.swap = "drain"` the commit waits for the generation instead."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from learner.transports.stream import tensors_as_bytes
from protos.anvil.v1 import common_pb2, rollout_pb2, rollout_pb2_grpc
from protos.channels import open_channel
from protos.weights_codec import push_weight_update
from tests.rollout.conftest import Served, start_process, stop_process
from tests.rollout.helpers import perturbed, teacher_forced_logprobs

PROBE = [4, 295, 289, 226, 22, 23, 16, 28, 36, 2, 5, 30, 31, 2]
TOL = 1e-4
LONG = 480
"""Tokens of the long generation: about 1 s on either engine here, while a tiny-model swap takes ~0.1 s."""


async def update_during_generation(served: Served, seed: int, num_samples: int = 4):
    """Start a long Sample, commit new weights 0.3 s into it; (reply, new model, commit returned first)."""
    new_model = perturbed(served.model, seed=seed)
    version = served.version + 1
    request = rollout_pb2.SampleRequest(
        prompt_tokens=PROBE,
        num_samples=num_samples,
        sampling_params=common_pb2.SamplingParams(max_tokens=LONG, seed=seed, ignore_eos=True),
    )
    async with open_channel(served.address) as channel:
        stub = rollout_pb2_grpc.RolloutServiceStub(channel)
        in_flight = asyncio.ensure_future(stub.Sample(request))
        await asyncio.sleep(0.3)
        await push_weight_update(channel, version, tensors_as_bytes(new_model.named_parameters()))
        committed_first = not in_flight.done()
        reply = await in_flight
    return reply, new_model, version, committed_first


def split_at_swap(sequence: rollout_pb2.SampledSequence, old: int, new: int) -> int:
    """Index of the first token of the new version; asserts old..old new..new, both non-empty."""
    versions = list(sequence.token_weight_versions)
    assert len(versions) == len(sequence.tokens) == LONG
    cut = versions.index(new)
    assert versions == [old] * cut + [new] * (LONG - cut), versions
    assert 0 < cut < LONG
    return cut


async def test_an_update_does_not_wait_for_a_long_generation(served):
    """Both engines, default settings (swap = "inflight", inflight_kv = "keep")."""
    old_version = served.version
    reply, new_model, version, committed_first = await update_during_generation(served, seed=11)
    assert committed_first, "the commit waited for the generation to end"
    assert reply.weight_version == old_version  # the oldest token's version
    for sequence in reply.sequences:
        cut = split_at_swap(sequence, old_version, version)
        # Tokens before the swap are exactly the old model's (teacher-forced).
        tokens = list(sequence.tokens)
        expected = teacher_forced_logprobs(served.model, PROBE + tokens)[len(PROBE) - 1 :]
        torch.testing.assert_close(torch.tensor(list(sequence.logprobs))[:cut], expected[:cut], atol=TOL, rtol=0)
    served.model, served.version = new_model, version


@pytest.fixture(scope="module", params=["drain", "recompute"])
def torch_server(request, tiny_model_dir: Path, base_model) -> Iterator[tuple[str, Served]]:
    """A torch-engine rollout process with `engine.swap = "drain"`, or in-flight with recomputed KV."""
    setting = 'engine.swap="drain"' if request.param == "drain" else 'engine.inflight_kv="recompute"'
    command = [sys.executable, "-m", "rollout", "--set", f'model="{tiny_model_dir}"', "--set", 'engine.type="torch"']
    process, address = start_process([*command, "--set", setting], "torch")
    yield request.param, Served(address, base_model)
    assert stop_process(process) == 0


async def test_drain_waits_and_recompute_matches_the_new_model(torch_server):
    mode, served = torch_server
    reply, new_model, version, committed_first = await update_during_generation(served, seed=12)
    if mode == "drain":
        assert not committed_first, "a drain-mode commit returned while the generation ran"
        for sequence in reply.sequences:
            assert list(sequence.token_weight_versions) == [served.version] * LONG
        return
    assert committed_first
    for sequence in reply.sequences:
        cut = split_at_swap(sequence, served.version, version)
        # With the KV recomputed, every token after the swap is exactly the new model's, given the prefix.
        expected = teacher_forced_logprobs(new_model, PROBE + list(sequence.tokens))[len(PROBE) - 1 :]
        torch.testing.assert_close(torch.tensor(list(sequence.logprobs))[cut:], expected[cut:], atol=TOL, rtol=0)
