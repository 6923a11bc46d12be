"""A gateway stopped and started again on the same state directory (over the package's learner and a
replica of its own - a replica serves one gateway's snapshots, whose versions only increase), cheap: what
it restores, what it must not, and a training client whose durable state is damaged reported lost by name
while the rest of its session comes back."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from coordinator.gateway.config import GatewayConfig
from coordinator.serve import start_gateway
from rollout.server import start_rollout
from tests.coordinator.gateway.conftest import SERVICE_KEY, TINKER_KEY, Stack, rollout_config
from tests.coordinator.gateway.test_rejections_and_ordering import _submit
from tests.coordinator.gateway.test_tinker_sdk import datum, random_sequences

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

ADAM = types.AdamParams(learning_rate=1e-2)
DATA = [datum(s, weights=[1.0] * (len(s) - 1)) for s in random_sequences(2, seed=7)]


def _start(stack: Stack, state_dir: Path, replica: str, port: int = 0):
    config = GatewayConfig(port=port, api_keys=[TINKER_KEY], state_dir=state_dir)
    return stack.run(start_gateway(config, stack.learner_address, [replica], SERVICE_KEY))


def _logprobs(training) -> list[list[float]]:
    return [o["logprobs"].data for o in training.forward(DATA, "cross_entropy").result().loss_fn_outputs]


def _written(path: str) -> Path:
    """The durable state at `path` once its background write has put it in place."""
    deadline = time.monotonic() + 60
    while not Path(path).is_dir():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.05)
    return Path(path)


def test_a_restarted_gateway_restores_what_is_open_and_names_what_it_cannot(
    stack: Stack, tmp_path: Path, tiny_model_dir: Path
):
    replica, _ = stack.threaded.start(start_rollout(rollout_config(tiny_model_dir)))
    gateway = _start(stack, tmp_path / "state", replica)
    port = int(gateway.address.rsplit(":", 1)[1])
    client = tinker.ServiceClient(base_url=f"http://{gateway.address}", api_key=TINKER_KEY)
    kept, damaged = (client.create_lora_training_client(base_model="anvil-tiny", rank=0).result() for _ in range(2))
    for training in (kept, damaged):
        training.forward_backward(DATA, "cross_entropy").result()
        training.optim_step(ADAM).result()
    kept.forward_backward(DATA, "cross_entropy").result()  # a gradient not stepped yet: replayed on the state
    before = _logprobs(kept)
    sampler = kept.save_weights_and_get_sampling_client()
    with stack.as_tenant():
        damaged_model = gateway.service.sessions.model(damaged.get_info().model_id)
        state = _written(damaged_model.durable_states[-1][1])
    weights = next(p for p in state.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated: its digest no longer matches

    other = tinker.ServiceClient(base_url=f"http://{gateway.address}", api_key=TINKER_KEY)
    finished = other.create_lora_training_client(base_model="anvil-tiny", rank=0).result().get_info().model_id
    other.close("success").result()  # a finished session is not restored

    http = httpx.Client(base_url=f"http://{gateway.address}", headers={"X-API-Key": TINKER_KEY}, timeout=60)
    kept_id = kept.get_info().model_id
    early = _submit(http, kept_id, 100, [[5, 6, 7, 8]])  # accepted, waiting for seq ids the SDK has not sent
    stack.run(gateway.stop())

    gateway = _start(stack, tmp_path / "state", replica, port)
    try:
        assert _logprobs(kept) == before  # the state as of its last request, gradient included
        kept.optim_step(ADAM).result()
        assert _logprobs(kept) != before
        prompt = types.ModelInput.from_ints([5, 6, 7])
        assert len(sampler.sample(prompt, 1, types.SamplingParams(max_tokens=2)).result().sequences) == 1

        lost = http.post("/api/v1/get_info", json={"model_id": damaged.get_info().model_id})
        assert lost.status_code == 404
        assert "lost in a server restart" in lost.json()["detail"] and "durable-" in lost.json()["detail"]
        assert "match" in lost.json()["detail"]  # the learner's reason: the file does not match its manifest
        gone = http.post("/api/v1/get_info", json={"model_id": finished})
        assert gone.status_code == 404 and "lost" not in gone.json()["detail"]

        # the early request is still queued under its id; a retry of it gets that id
        assert _submit(http, kept_id, 100, [[5, 6, 7, 8]]) == early
        with stack.as_tenant():
            model = gateway.service.sessions.model(kept_id)
            assert model.executor.next_seq_id < 100
        reply = http.post("/api/v1/retrieve_future", json={"request_id": early}).json()
        assert reply["type"] == "try_again"
    finally:
        http.close()
        client.close("success").result()
        stack.run(gateway.stop())
