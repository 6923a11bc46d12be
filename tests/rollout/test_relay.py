"""The "stream" transport's relay: the learner sends the weights once, replicas pass them down a chain.

Real torch rollout servers on loopback. Checked against the weights themselves: every replica that
reports success serves logprobs equal (to fp32 rounding) to a transformers forward pass of the new
model, and all of them serve the same numbers; the learner's egress is one model whatever the number
of replicas. A middle replica that dies, or stops (SIGSTOP) mid-relay, costs only itself: the replicas
behind it get the weights sent directly, and one that missed an update serves its old weights bit for bit.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from learner.transports import PublishContext, make_transport
from learner.transports.relay import RelayTransport
from protos.anvil.v1 import rollout_pb2_grpc
from protos.channels import open_channel
from protos.rpc import ServerConfig
from rollout.config import RolloutConfig, TorchEngineConfig
from rollout.server import start_rollout
from tests.rollout.conftest import start_rollout_process, stop_process
from tests.rollout.helpers import perturbed
from tests.rollout.test_weight_updates import assert_serves, served_logprobs


async def start_replica(model_dir: Path):
    config = RolloutConfig(
        model=model_dir, model_name="anvil-tiny", server=ServerConfig(), engine=TorchEngineConfig(device="cpu")
    )
    running, _ = await start_rollout(config)
    return running


class Weights:
    """A WeightSource over a plain model (what a learner backend hands a transport)."""

    def __init__(self, model) -> None:
        self.model = model

    def named_weights(self):
        return self.model.named_parameters()

    def save_weights(self, directory: Path) -> None:
        raise AssertionError("the stream transport never writes a directory")


def transport(tmp_path: Path, timeout_s: float | None = None, before_push=None) -> RelayTransport:
    context = PublishContext(tmp_path, "anvil-tiny", api_key=None, target_timeout_s=timeout_s)
    relay = make_transport("stream", ["a", "b"], context)
    assert isinstance(relay, RelayTransport), "a relay is what the default transport does for several replicas"
    if before_push is not None:
        original = relay._relay

        async def hooked(*args):
            await before_push()
            return await original(*args)

        relay._relay = hooked
    return relay


async def serves(address: str) -> tuple[list[float], int]:
    async with open_channel(address) as channel:
        return await served_logprobs(rollout_pb2_grpc.RolloutServiceStub(channel))


async def test_three_replicas_take_one_send(tmp_path, tiny_model_dir, base_model):
    replicas = [await start_replica(tiny_model_dir) for _ in range(3)]
    try:
        new_model = perturbed(base_model, seed=11)
        model_bytes = sum(p.numel() * 4 for p in new_model.parameters())
        targets = [r.address for r in replicas]
        results = await transport(tmp_path).publish(1, Weights(new_model), targets)
        assert [r.error for r in results] == [None, None, None]
        assert [r.relayed for r in results] == [False, True, True]
        assert sum(r.num_bytes for r in results) == model_bytes, "the learner's egress is one model"
        served = [await serves(address) for address in targets]
        assert {version for _, version in served} == {1}
        for logprobs, _ in served:
            assert_serves(logprobs, new_model)
        assert served[0][0] == served[1][0] == served[2][0], "each replica verified the same bytes"
    finally:
        for replica in replicas:
            await replica.stop(0)


@pytest.mark.parametrize("killed", [0, 1])
async def test_a_replica_killed_mid_relay_costs_only_itself(tmp_path, tiny_model_dir, base_model, killed):
    """Killed after it opened the update, as the push starts: the head (the learner's own send fails) or
    the middle (the head's relay to it fails). The replicas behind it get the weights sent directly."""
    replicas = [await start_replica(tiny_model_dir) for _ in range(3)]
    try:
        new_model = perturbed(base_model, seed=12)
        model_bytes = sum(p.numel() * 4 for p in new_model.parameters())
        relay = transport(tmp_path, timeout_s=30, before_push=lambda: replicas[killed].stop(0))
        results = await relay.publish(1, Weights(new_model), [r.address for r in replicas])
        assert results[killed].error is not None and replicas[killed].address in str(results[killed].error)
        alive = [index for index in range(3) if index != killed]
        assert all(results[index].error is None for index in alive)
        assert not any(results[index].relayed for index in alive), "the relay broke: they got direct sends"
        assert results[2].num_bytes == model_bytes
        served = [await serves(replicas[index].address) for index in alive]
        assert served[0] == served[1] and served[0][1] == 1
        assert_serves(served[0][0], new_model)
    finally:
        for replica in replicas:
            await replica.stop(0)


async def test_a_stopped_middle_replica_stalls_the_relay_only_briefly(tmp_path, tiny_model_dir, base_model):
    """SIGSTOP after it opened the update: its flow control stops the relay; the stall limit (half the
    target timeout) gives up on it, the last replica gets a direct send, and the one in front is unharmed."""
    first, last = await start_replica(tiny_model_dir), await start_replica(tiny_model_dir)
    process, middle = start_rollout_process(tiny_model_dir, "torch")
    try:

        async def stop_middle():
            os.kill(process.pid, signal.SIGSTOP)

        before = await serves(middle)
        new_model = perturbed(base_model, seed=13)
        relay = transport(tmp_path, timeout_s=6, before_push=stop_middle)
        results = await relay.publish(1, Weights(new_model), [first.address, middle, last.address])
        assert [r.error is None for r in results] == [True, False, True]
        assert "6s" in str(results[1].error) or "3s" in str(results[1].error)
        os.kill(process.pid, signal.SIGCONT)
        assert await serves(middle) == before, "a replica that missed the update serves its old weights, bit for bit"
        assert before[1] == 0
        for address in (first.address, last.address):
            logprobs, version = await serves(address)
            assert version == 1
            assert_serves(logprobs, new_model)
    finally:
        os.kill(process.pid, signal.SIGCONT)
        stop_process(process)
        for replica in (first, last):
            await replica.stop(0)


@pytest.mark.parametrize("targets", [["x:1", "x:1"]])
def test_a_repeated_target_is_refused(tmp_path, targets):
    from protos.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="more than once"):
        make_transport("stream", targets, PublishContext(tmp_path, "anvil-tiny", None))


def test_the_relay_metadata_round_trips():
    from protos.weights_relay import relay_chain, relay_metadata

    assert relay_chain(relay_metadata(["a:1", "b:2"], 2.5)) == (["a:1", "b:2"], 2.5)
    assert relay_chain(()) == ([], 10.0)
