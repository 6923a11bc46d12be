"""kill -9 of `anvil serve` (its learner and replica die with it) mid-training - from outside, and from a
failpoint inside a forward_backward or an optimizer step after the learner ran it but before the gateway
recorded it - then `anvil serve` again on the same port and state directory: the official SDK's clients
made before the kill carry on (a future polling through the outage gets its answer), and every request
runs exactly once. And SIGSTOP of `anvil serve`: a client's deadline fires, and after SIGCONT it goes on.

Checked against an independent computation: after the restart, a fresh training client is given the
same requests from scratch; the restored clients' weights must then give the same logprobs, bit for
bit. A lost step, a lost gradient or a step run twice would change them.
"""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
from tinker import types  # noqa: E402

from servicekit.failpoints import ENV, ONCE_DIR_ENV  # noqa: E402
from tests.coordinator.gateway.conftest import start_anvil_serve  # noqa: E402
from tests.coordinator.gateway.test_rejections_and_ordering import _result, _submit, sdk_pb  # noqa: E402
from tests.coordinator.gateway.test_tinker_sdk import datum, random_sequences  # noqa: E402

KEY = "tml-restart-test"
ADAM = types.AdamParams(learning_rate=1e-2)
PROBE_SEQUENCES = random_sequences(3, seed=99)
PROBE = [datum(s, weights=[1.0] * (len(s) - 1)) for s in PROBE_SEQUENCES]


def _data(sequences: list[list[int]]) -> list[types.Datum]:
    return [datum(s, weights=[1.0] * (len(s) - 1)) for s in sequences]


def _batches() -> list[list[types.Datum]]:
    return [_data(random_sequences(2, seed=k)) for k in range(4)]


def _probe_logprobs(training) -> list[np.ndarray]:
    out = training.forward(PROBE, "cross_entropy").result()
    return [np.asarray(o["logprobs"].data) for o in out.loss_fn_outputs]


def _serve(tmp_path: Path, port: int, env: dict[str, str] | None = None) -> tuple:
    settings = [
        f"port={port}",
        f'api_keys=["{KEY}"]',
        f'state_dir="{tmp_path / "state"}"',
        'services.rollout_engine.type="torch"',
    ]
    return start_anvil_serve(tmp_path, settings, env)


def _rest_model(http: httpx.Client, session_id: str) -> str:
    created = http.post("/api/v1/create_model", json={"session_id": session_id, "model_seq_id": 7, "lora_config": {}})
    created.raise_for_status()
    assert "error" not in _result(http, created.json()["request_id"]).json()
    return created.json()["model_id"]


def _optim_step(http: httpx.Client, model_id: str, seq_id: int) -> str:
    body = {"model_id": model_id, "seq_id": seq_id, "adam_params": {"learning_rate": 1e-2}}
    reply = http.post("/api/v1/optim_step", json=body)
    reply.raise_for_status()
    return reply.json()["request_id"]


@pytest.mark.integration
def test_kill_9_of_anvil_serve_loses_nothing_and_repeats_nothing(tmp_path: Path, anvil_home: Path):
    process, address = _serve(tmp_path, 0)
    port = int(address.rsplit(":", 1)[1])
    base_url = f"http://{address}"
    batches = _batches()
    rest_data = [random_sequences(1, seed=50 + k) for k in range(3)]
    client = tinker.ServiceClient(base_url=base_url, api_key=KEY)
    try:
        # An SDK training client: three steps, a named state, a sampling client, and a gradient not yet stepped.
        trained = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        for batch in batches[:3]:
            trained.forward_backward(batch, "cross_entropy").result()
            trained.optim_step(ADAM).result()
        state = trained.save_state("before-the-kill").result()
        sampler = trained.save_weights_and_get_sampling_client()
        trained.forward_backward(batches[3], "cross_entropy").result()

        # A raw REST client: seq 1 finished (its answer kept), seq 3 accepted but waiting for seq 2.
        http = httpx.Client(base_url=base_url, headers={"X-API-Key": KEY}, timeout=60)
        session_id = client.holder.get_session_id()
        rest_model = _rest_model(http, session_id)
        first = _submit(http, rest_model, 1, rest_data[0])
        first_answer = _result(http, first).content
        early = _submit(http, rest_model, 3, rest_data[2])
    finally:
        process.kill()
        process.wait(timeout=60)

    process, address = _serve(tmp_path, port)
    restored = [line for line in (tmp_path / "serve.log").read_text().splitlines() if "restored from" in line]
    assert restored and "1 session(s), 2 training client(s)" in restored[0], restored
    assert "1 sampling client(s); 0 training client(s) lost" in restored[0]
    print(restored[0])
    try:
        # The SDK client goes on: the optimizer step applies the gradient accumulated before the kill.
        trained.optim_step(ADAM).result()
        restored = _probe_logprobs(trained)
        samples = sampler.sample(types.ModelInput.from_ints([5, 6, 7]), 1, types.SamplingParams(max_tokens=3))
        assert len(samples.result().sequences[0].tokens) == 3
        rest = client.create_rest_client()
        saved = [c.checkpoint_id for c in rest.list_checkpoints(trained.get_info().model_id).result().checkpoints]
        assert "weights/before-the-kill" in saved and state.path.endswith("before-the-kill")

        # The REST client: a retry of seq 1 gets its first request id and answer (no second run), seq 2
        # arrives, and seq 3 - accepted before the kill - runs under its old request id.
        assert _submit(http, rest_model, 1, rest_data[0]) == first
        again = sdk_pb.ForwardBackwardOutput.FromString(_result(http, first).content)
        assert again == sdk_pb.ForwardBackwardOutput.FromString(first_answer)  # its timings too: not run again
        second = _submit(http, rest_model, 2, rest_data[1])
        assert _result(http, second).status_code == 200
        assert _result(http, early).headers["content-type"].startswith("application/x-protobuf")
        assert "error" not in _result(http, _optim_step(http, rest_model, 4)).json()

        # Reference: fresh training clients given the same requests, once each, after the restart.
        reference = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        for batch in batches:
            reference.forward_backward(batch, "cross_entropy").result()
            reference.optim_step(ADAM).result()
        for got, want in zip(restored, _probe_logprobs(reference), strict=True):
            np.testing.assert_array_equal(got, want)

        rest_reference = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        for sequences in rest_data:
            rest_reference.forward_backward(_data(sequences), "cross_entropy").result()
        rest_reference.optim_step(ADAM).result()
        probe_id = _submit(
            http,
            rest_model,
            5,
            PROBE_SEQUENCES,
        )
        got = _json_result(http, probe_id)["loss_fn_outputs"]
        for output, want in zip(got, _probe_logprobs(rest_reference), strict=True):
            np.testing.assert_array_equal(np.asarray(output["logprobs"]["data"], dtype=np.float32), want)
        http.close()
    finally:
        client.close("success").result()
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=60)
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _json_result(http: httpx.Client, request_id: str) -> dict:
    while True:
        reply = http.post("/api/v1/retrieve_future", json={"request_id": request_id}).json()
        if reply.get("type") != "try_again":
            return reply


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["forward_backward", "optim_step"])
def test_a_gateway_killed_inside_a_request_finishes_it_once_after_a_restart(tmp_path: Path, anvil_home, kind):
    """The gateway dies (failpoint `gateway.<kind>`) after its learner ran the request and before the outcome
    was recorded. The SDK's future, polling through the outage, gets the request's result after the
    restart, and the model has it applied exactly once."""
    fired = tmp_path / "fired"
    fired.mkdir()
    env = {ENV: f"gateway.{kind}=kill@2", ONCE_DIR_ENV: str(fired)}
    process, address = _serve(tmp_path, 0, env)
    port = int(address.rsplit(":", 1)[1])
    client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
    batches = _batches()
    try:
        trained = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        trained.forward_backward(batches[0], "cross_entropy").result()
        trained.optim_step(ADAM).result()
        stepped = trained.forward_backward(batches[1], "cross_entropy")
        if kind == "optim_step":
            stepped.result()
            stepped = trained.optim_step(ADAM)
        assert process.wait(timeout=120) == -signal.SIGKILL, "the failpoint killed anvil serve"
        assert [p.name for p in fired.iterdir()] == [f"gateway.{kind}"]
        process, _ = _serve(tmp_path, port, env)
        stepped.result(timeout=300)  # the same future: answered by the restarted gateway
        if kind == "forward_backward":
            trained.optim_step(ADAM).result()
        reference = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        for batch in batches[:2]:
            reference.forward_backward(batch, "cross_entropy").result()
            reference.optim_step(ADAM).result()
        for got, want in zip(_probe_logprobs(trained), _probe_logprobs(reference), strict=True):
            np.testing.assert_array_equal(got, want)
    finally:  # bounded, so a failure above is reported rather than hidden behind a close that never ends
        with contextlib.suppress(Exception):
            client.close("success").result(timeout=30)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.mark.integration
def test_a_stopped_gateway_lets_the_clients_deadline_fire_and_then_goes_on(tmp_path: Path, anvil_home):
    """SIGSTOP of anvil serve mid-training: a client's deadline fires (no hang past it); after SIGCONT the
    same request completes, once."""
    process, address = _serve(tmp_path, 0)
    client = tinker.ServiceClient(base_url=f"http://{address}", api_key=KEY)
    batches = _batches()
    try:
        trained = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        trained.forward_backward(batches[0], "cross_entropy").result()
        process.send_signal(signal.SIGSTOP)
        stepped = trained.optim_step(ADAM)
        with pytest.raises(TimeoutError):
            stepped.result(timeout=3)
        process.send_signal(signal.SIGCONT)
        stepped.result(timeout=120)
        reference = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        reference.forward_backward(batches[0], "cross_entropy").result()
        reference.optim_step(ADAM).result()
        for got, want in zip(_probe_logprobs(trained), _probe_logprobs(reference), strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        process.send_signal(signal.SIGCONT)
        client.close("success").result()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
