"""TLS with certificates the test makes (trustme): a gRPC server refuses plain text, untrusted servers and
- under mutual TLS - callers without a certificate from its CA; and `anvil serve` with every service on
mutual TLS and the REST API on HTTPS trains and samples through the unmodified tinker SDK."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import tls
from protos.channels import open_channel
from protos.errors import InvalidArgument
from protos.rpc import ServerConfig, start_server

trustme = pytest.importorskip("trustme", reason="trustme is a dev dependency (pip install -e .[dev])")


class Certs:
    """A CA with a server certificate for loopback and a client certificate, as PEM files; and a second,
    unrelated CA (an attacker's, or a misconfiguration)."""

    def __init__(self, directory: Path) -> None:
        self.ca, self.other_ca = trustme.CA(), trustme.CA()
        server, client = self.ca.issue_cert("127.0.0.1", "localhost"), self.ca.issue_cert("anvil-service")
        stranger = self.other_ca.issue_cert("anvil-service")
        self.files: dict[str, Path] = {}
        for name, blob in {
            "ca": self.ca.cert_pem,
            "other_ca": self.other_ca.cert_pem,
            "server_cert": server.cert_chain_pems[0],
            "server_key": server.private_key_pem,
            "client_cert": client.cert_chain_pems[0],
            "client_key": client.private_key_pem,
            "stranger_cert": stranger.cert_chain_pems[0],
            "stranger_key": stranger.private_key_pem,
        }.items():
            blob.write_to_path(str(directory / f"{name}.pem"))
            self.files[name] = directory / f"{name}.pem"

    def client_env(self, ca: str = "ca", cert: str | None = "client") -> dict[str, str]:
        env = {tls.TRUSTED_CA: str(self.files[ca])}
        if cert:
            env |= {tls.CLIENT_CERT: str(self.files[f"{cert}_cert"]), tls.CLIENT_KEY: str(self.files[f"{cert}_key"])}
        return env

    def server_env(self, mutual: bool) -> dict[str, str]:
        env = {tls.SERVER_CERT: str(self.files["server_cert"]), tls.SERVER_KEY: str(self.files["server_key"])}
        return env | ({tls.CLIENT_CA: str(self.files["ca"])} if mutual else {})


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


async def _answers(address: str) -> bool:
    async with open_channel(address) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
            return False
    return True


def _clear(monkeypatch) -> None:
    for name in tls.VARIABLES:
        monkeypatch.delenv(name, raising=False)


async def test_grpc_tls_and_mutual_tls(certs: Certs, monkeypatch):
    _clear(monkeypatch)
    files = certs.files
    server = await start_server(ServerConfig(tls_cert=files["server_cert"], tls_key=files["server_key"]), [])
    mutual = await start_server(
        ServerConfig(tls_cert=files["server_cert"], tls_key=files["server_key"], tls_client_ca=files["ca"]), []
    )
    try:
        assert not await _answers(server.address)  # plain text to a TLS server
        cases = [  # (client environment, answers from the TLS server, answers from the mutual-TLS server)
            (certs.client_env(cert=None), True, False),  # no client certificate
            (certs.client_env(), True, True),
            (certs.client_env(cert="stranger"), True, False),  # a certificate from another CA
            (certs.client_env(ca="other_ca"), False, False),  # the server's certificate is not trusted
        ]
        for env, plain_tls, mutual_tls in cases:
            _clear(monkeypatch)
            for name, value in env.items():
                monkeypatch.setenv(name, value)
            assert await _answers(server.address) is plain_tls, env
            assert await _answers(mutual.address) is mutual_tls, env
    finally:
        await server.stop()
        await mutual.stop()


def test_half_configured_tls_is_an_error_naming_what_to_set(certs: Certs, monkeypatch):
    _clear(monkeypatch)
    monkeypatch.setenv(tls.SERVER_CERT, str(certs.files["server_cert"]))
    with pytest.raises(InvalidArgument, match=tls.SERVER_KEY):
        tls.server_credentials()
    _clear(monkeypatch)
    monkeypatch.setenv(tls.CLIENT_CERT, str(certs.files["client_cert"]))
    with pytest.raises(InvalidArgument, match=tls.TRUSTED_CA):
        tls.channel_credentials()
    monkeypatch.setenv(tls.TRUSTED_CA, "/nonexistent/ca.pem")
    monkeypatch.setenv(tls.CLIENT_KEY, str(certs.files["client_key"]))
    with pytest.raises(InvalidArgument, match=r"ANVIL_TLS_CA .*cannot be read"):
        tls.channel_credentials()


@pytest.mark.integration
def test_anvil_serve_with_mutual_tls_between_services_and_https(certs: Certs, tmp_path: Path, monkeypatch, anvil_home):
    tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency")
    from tinker import types

    from tests.coordinator.gateway.conftest import start_anvil_serve
    from tests.coordinator.gateway.test_tinker_sdk import datum

    _clear(monkeypatch)
    for name, value in (certs.server_env(mutual=True) | certs.client_env()).items():
        monkeypatch.setenv(name, value)  # inherited by anvil serve, and passed on to its learner and replica
    key, state = "tml-tls-test", tmp_path / "state"
    settings = [
        "port=0", f'api_keys=["{key}"]', f'state_dir="{state}"', 'services.rollout_engine.type="torch"',
        f'tls_cert="{certs.files["server_cert"]}"', f'tls_key="{certs.files["server_key"]}"',
    ]  # fmt: skip
    process, address = start_anvil_serve(tmp_path, settings)
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(certs.files["ca"]))  # httpx (under the SDK) trusts our CA
        client = tinker.ServiceClient(base_url=f"https://{address}", api_key=key)
        training = client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
        data = [datum([5, 6, 7, 8], weights=[1.0] * 3)]
        training.forward_backward(data, "cross_entropy").result()
        training.optim_step(types.AdamParams(learning_rate=1e-3)).result()
        sampler = training.save_weights_and_get_sampling_client()  # the replica hot-loads it over TLS
        sample = sampler.sample(types.ModelInput.from_ints([5, 6]), 1, types.SamplingParams(max_tokens=2)).result()
        assert len(sample.sequences) == 1
        client.close("success").result()

        with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
            httpx.post(f"http://{address}/api/v1/create_session", json={}, headers={"X-API-Key": key}, timeout=10)
        learner = json.loads((state / "services.json").read_text())["learner"]["address"]
        _clear(monkeypatch)
        monkeypatch.setenv(tls.TRUSTED_CA, str(certs.files["ca"]))
        import asyncio

        assert not asyncio.run(_answers(learner))  # the learner wants a client certificate
        for name, value in certs.client_env().items():
            monkeypatch.setenv(name, value)
        assert asyncio.run(_answers(learner))
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-3000:]


@pytest.mark.integration
def test_anvil_run_over_mutual_tls(certs: Certs, tmp_path: Path):
    """The RL loop's every hop on mutual TLS: batches and steps to the learner, weight pushes from the
    learner to the replica, samples from the replica (a plain-text hop anywhere would fail the run)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in tls.VARIABLES}
    env |= certs.server_env(mutual=True) | certs.client_env()
    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "anvil"), "run", "configs/copy_digit.toml", "--run-dir", str(run_dir)]
    for setting in ("loop.steps=2", "loop.checkpoint_every=0", 'services.rollout_engine.type="torch"'):
        command += ["--set", setting]
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(row["time/weight_sync_s"] > 0 for row in metrics)
