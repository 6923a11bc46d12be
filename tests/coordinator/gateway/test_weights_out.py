"""Weights out of the gateway, with the official SDK and its CLI: save_weights_external and the signed URLs
the gateway serves itself (`tinker checkpoint download` of a training state and of external weights), a
checkpoint's TTL, copy_weights (shared bytes, outliving its source), and publish. What is downloaded is
checked by loading it with transformers and comparing its logprobs with the learner's own forward pass."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import torch

from tests.coordinator.gateway.conftest import OTHER_TENANT_KEY, TINKER_KEY
from tests.coordinator.gateway.test_tinker_sdk import datum, hf_logprobs

tinker = pytest.importorskip("tinker", reason="tinker==0.38.0 is a dev dependency (pip install -e .[dev])")
transformers = pytest.importorskip("transformers")
from tinker import types  # noqa: E402

SEQUENCE = [5, 9, 14, 3, 22, 7, 11]
WEIGHTS = [1.0] * (len(SEQUENCE) - 1)


@pytest.fixture(scope="module")
def rest(stack):
    return tinker.RestClient(base_url=stack.base_url, api_key=TINKER_KEY)


@pytest.fixture(scope="module")
def bob(stack):
    """The service client of another tenant."""
    client = tinker.ServiceClient(base_url=stack.base_url, api_key=OTHER_TENANT_KEY)
    yield client
    client.close("success").result()


@pytest.fixture(scope="module")
def trained(service_client):
    """A training client one AdamW step away from the base model, and its own logprobs of SEQUENCE."""
    training = service_client.create_lora_training_client(base_model="anvil-tiny", rank=0).result()
    training.forward_backward([datum(SEQUENCE, weights=WEIGHTS)], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    logprobs = (
        training.forward([datum(SEQUENCE, weights=WEIGHTS)], "cross_entropy").result().loss_fn_outputs[0]["logprobs"]
    )
    return training, torch.tensor(logprobs.tolist())


def cli_download(stack, path: str, output: Path) -> Path:
    """`tinker checkpoint download PATH --output OUTPUT`, the SDK's own CLI, against the gateway."""
    env = {**os.environ, "TINKER_BASE_URL": stack.base_url, "TINKER_API_KEY": TINKER_KEY}
    command = [sys.executable, "-m", "tinker.cli", "checkpoint", "download", path, "--output", str(output)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return output / path.removeprefix("tinker://").replace("/", "_")


def assert_same_model(directory: Path, expected_logprobs: torch.Tensor) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf_logprobs(model, SEQUENCE), expected_logprobs, rtol=1e-4, atol=1e-5)


def test_tinker_checkpoint_download_of_a_training_state(stack, rest, trained, tmp_path):
    training, logprobs = trained
    state = training.save_state("for-download").result().path
    folder = cli_download(stack, state, tmp_path)
    assert (folder / "config.json").is_file() and list(folder.glob("*.safetensors"))
    assert_same_model(folder, logprobs)
    exports = [c for r in rest.list_training_runs().result().training_runs for c in rest_checkpoints(rest, r)]
    assert not [c for c in exports if c.checkpoint_type == "external"], "the CLI's temporary export is deleted"


def test_external_weights_urls_are_signed_and_need_no_key(stack, rest, trained, tmp_path):
    training, logprobs = trained
    saved = training.save_weights_external("export").result()
    assert saved.path == f"tinker://{training.model_id}/external_weights/export"
    answer = rest.get_external_weights_urls(saved.path).result()
    assert "config.json" in answer.urls and answer.expires.timestamp() > time.time() + 3000
    for relative, url in answer.urls.items():  # plain GETs, no API key
        with urllib.request.urlopen(url, timeout=30) as response:
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_bytes(response.read())
    assert_same_model(tmp_path, logprobs)

    url = answer.urls["config.json"]
    forged = url[:-1] + ("0" if url[-1] != "0" else "1")
    other_file = url.replace("/config.json?", "/../../../secret?")
    for bad in (forged, other_file):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=30)
        assert refused.value.code in (403, 404)
    rest.delete_checkpoint_from_tinker_path(saved.path).result()  # its signed URLs stop working
    with pytest.raises(urllib.error.HTTPError) as gone:
        urllib.request.urlopen(url, timeout=30)
    assert gone.value.code == 403 and b"deleted" in gone.value.read()
    assert stack.gateway.service.checkpoints.unscoped(saved.path) is None


def test_ttl_expires_a_checkpoint_and_out_of_range_is_refused(stack, rest, trained):
    training, _ = trained
    path = training.save_state("short-lived", ttl_seconds=3600).result().path
    listed = {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    assert abs(listed[path].expires_at.timestamp() - (time.time() + 3600)) < 120
    rest.set_checkpoint_ttl_from_tinker_path(path, 7200).result()
    listed = {c.tinker_path: c for c in rest.list_checkpoints(training.model_id).result().checkpoints}
    assert abs(listed[path].expires_at.timestamp() - (time.time() + 7200)) < 120
    with pytest.raises(tinker.BadRequestError, match="ttl_seconds 10 is out of range"):
        rest.set_checkpoint_ttl_from_tinker_path(path, 10).result()
    with pytest.raises(tinker.RequestFailedError, match="out of range"):
        training.save_state("too-short", ttl_seconds=60).result()

    checkpoints = stack.gateway.service.checkpoints
    with stack.as_tenant():
        directory = Path(checkpoints.get(path).local_path)
    checkpoints.clock = lambda: time.time() + 7300  # two hours on
    try:
        listed = [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints]
        assert path not in listed
        with pytest.raises(tinker.NotFoundError):
            rest.get_weights_info_by_tinker_path(path).result()
        assert str(directory) in checkpoints.take_expired()
    finally:
        checkpoints.clock = time.time
    assert path not in [c.tinker_path for c in rest.list_checkpoints(training.model_id).result().checkpoints]


def test_copy_weights_shares_bytes_and_outlives_its_source(stack, rest, trained):
    training, logprobs = trained
    source = training.save_state("to-copy").result().path
    archive = tinker.ServiceClient(base_url=stack.base_url, api_key=TINKER_KEY, project_id="archive")
    try:
        copied = archive.copy_weights(source, ttl_seconds=3600).result()
        assert copied.startswith("tinker://copy-") and copied.endswith("/weights/to-copy")
        checkpoints = stack.gateway.service.checkpoints
        with stack.as_tenant():
            source_files = sorted(Path(checkpoints.get(source).local_path).rglob("*.safetensors"))
            copy_files = sorted(Path(checkpoints.get(copied).local_path).rglob("*.safetensors"))
        assert source_files and [f.stat().st_ino for f in source_files] == [f.stat().st_ino for f in copy_files]
        rest.delete_checkpoint_from_tinker_path(source).result()
        run = rest.get_training_run_by_tinker_path(copied).result()
        assert run.base_model == "anvil-tiny"
        restored = archive.create_training_client_from_state(copied).result()
        again = (
            restored.forward([datum(SEQUENCE, weights=WEIGHTS)], "cross_entropy")
            .result()
            .loss_fn_outputs[0]["logprobs"]
        )
        torch.testing.assert_close(torch.tensor(again.tolist()), logprobs, rtol=1e-5, atol=1e-6)
    finally:
        archive.close("success").result()

    body = {"source_path": copied, "destination_project_id": "archive"}
    headers = {"X-API-Key": TINKER_KEY, "X-Idempotency-Key": "copy-once"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as http:
        first, second = (http.post("/api/v1/copy_weights", json=body).json() for _ in range(2))
        assert first == second, "one idempotency key, one copy"
        reused = http.post("/api/v1/copy_weights", json={**body, "ttl_seconds": 3600})
        assert reused.status_code == 400 and "already answered another" in reused.json()["detail"]
        missing = http.post(
            "/api/v1/copy_weights", json={**body, "source_path": source}, headers={"X-Idempotency-Key": "new"}
        )
        assert missing.status_code == 404


def test_a_published_checkpoint_is_readable_but_not_changeable_by_another_tenant(stack, rest, bob, trained):
    training, _ = trained
    path = training.save_weights_for_sampler("shared").result().path
    other = tinker.RestClient(base_url=stack.base_url, api_key=OTHER_TENANT_KEY)
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(path).result()
    rest.publish_checkpoint_from_tinker_path(path).result()
    assert [c.public for c in rest.list_checkpoints(training.model_id).result().checkpoints if c.tinker_path == path]
    assert other.get_weights_info_by_tinker_path(path).result().base_model == "anvil-tiny"
    sampler = bob.create_sampling_client(model_path=path).result()
    assert len(sampler.compute_logprobs(types.ModelInput.from_ints(SEQUENCE)).result()) == len(SEQUENCE)
    with pytest.raises(tinker.BadRequestError, match="only its owner"):
        other.delete_checkpoint_from_tinker_path(path).result()
    rest.unpublish_checkpoint_from_tinker_path(path).result()
    with pytest.raises(tinker.NotFoundError):
        other.get_weights_info_by_tinker_path(path).result()


def rest_checkpoints(rest, run) -> list:
    return rest.list_checkpoints(run.training_run_id).result().checkpoints
