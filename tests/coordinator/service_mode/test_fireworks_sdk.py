"""Fireworks' full-parameter RL workflow through the unmodified `fireworks-ai` SDK against `anvil serve`:
the SDK-only driver end to end, one trainer hot-loading several deployments, loraRank > 0 refused at job
creation with nothing left running, a corrupted hot-load refused with the deployment serving the previous
snapshot bit for bit, and jobs and deployments - and a trainer job's training client - surviving a
restart of `anvil serve`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.coordinator.service_mode.conftest import KEY, start_serve, trained_policy

fw = pytest.importorskip("fireworks.training.sdk", reason="fireworks-ai[training-sdk]==1.2.30 is a dev dependency")

DRIVER = Path(__file__).resolve().parents[3] / "examples" / "fireworks_rl_driver.py"
PROMPT = [4, 40, 405, 226, 28]


def run_driver(serve, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DRIVER), "--base-url", serve.base_url, "--api-key", KEY, *extra],
        capture_output=True,
        text=True,
        timeout=540,
    )


def rows(serve, table: str) -> int:
    with sqlite3.connect(serve.state_dir / "service_mode" / "resources.sqlite") as db:
        return db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def hot_load_status(serve, deployment_id: str) -> list[dict]:
    """Fireworks' hot-load status API: one entry per replica."""
    import httpx

    headers = {"X-Api-Key": KEY, "fireworks-deployment": f"accounts/anvil/deployments/{deployment_id}"}
    return httpx.get(f"{serve.base_url}/hot_load/v1/models/hot_load", headers=headers).json()["replicas"]


def served_identity(serve, deployment_id: str) -> str | None:
    replicas = hot_load_status(serve, deployment_id)
    assert len({r["current_snapshot_identity"] for r in replicas}) == 1
    return replicas[0]["current_snapshot_identity"]


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_the_sdk_only_driver_end_to_end(serve):
    baseline = serve.children()
    # The seed workflow's model names: every route (deployment, trainer job, its Tinker layer, sampling)
    # resolves `accounts/<account>/models/<name>` to the served model.
    completed = run_driver(serve, "--base-model", "accounts/fireworks/models/anvil-tiny")
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])

    # samples from the hot-loaded deployment: the sampler's logprobs are the trainer's on the same tokens
    assert len(result["samples"]) == 2
    for sample in result["samples"]:
        assert len(sample["tokens"]) == len(sample["sampler"]) > 0
        np.testing.assert_allclose(sample["sampler"], sample["learner"], rtol=1e-4, atol=1e-4)
    # training moved the model; save_state / load_state_with_optimizer restored a state by name
    assert result["forward_after_load"] != result["forward_before"]
    assert result["state_path"] in result["checkpoints"] and "://" not in result["state_path"]
    assert result["optim_metrics"]["grad_norm:mean"] > 0
    # base then delta: the delta of a 1e-6 step is a fraction of the full snapshot
    base, delta = (serve.state_dir / "service_mode" / "snapshots" / name for name in result["snapshots"])
    assert json.loads((delta / "snapshot.json").read_text())["kind"] == "delta"
    assert size(delta) < 0.7 * size(base)
    # deleted at the end: the records are gone and so are their processes
    assert rows(serve, "deployments") == rows(serve, "trainer_jobs") == 0
    assert serve.children() == baseline


def test_one_trainer_hot_loads_several_deployments(serve):
    """One RLOR trainer job's snapshots, base then delta, hot-loaded into two deployments: each serves the
    trainer's weights (its logprobs are the trainer's on the same tokens), and the two agree bit for bit."""
    baseline = serve.children()
    deployments = fw.DeploymentManager(api_key=KEY, base_url=serve.base_url)
    names = ("left", "right")
    for name in names:
        deployments.create_or_get(fw.DeploymentConfig(deployment_id=name, base_model="anvil-tiny"))
    for name in names:
        deployments.wait_for_ready(name)
    trainers, endpoint, _service, policy, data = trained_policy(serve, PROMPT, learning_rate=1e-2)
    syncers = {name: fw.WeightSyncer(policy_client=policy, deploy_mgr=deployments, deployment_id=name,
                                     base_model="anvil-tiny") for name in names}  # fmt: skip
    prompt = fw.ModelInput.from_ints(PROMPT)
    for step, kind in enumerate(("base", "delta")):
        if step:
            policy.forward_backward(data, "cross_entropy").result()
            policy.optim_step(fw.AdamParams(learning_rate=1e-2)).result()
        identity = syncers["left"].save_only(f"shared-{step}", checkpoint_type=kind)
        for name in names:
            assert syncers[name].hotload(identity, kind), deployments.last_hotload_error_message
            assert served_identity(serve, name) == identity
        learner = policy.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
        served = {}
        for name in names:
            sampler = fw.FiretitanSamplingClient(syncers[name].get_deployment_sampler())
            served[name] = sampler.compute_logprobs(prompt).result()
            sampler.close()
        assert served["left"] == served["right"], "the same snapshot serves the same logprobs everywhere"
        np.testing.assert_allclose(served["left"][1:], learner, rtol=1e-4, atol=1e-4)
    for name in names:
        deployments.delete(name)
    trainers.delete(endpoint.job_id)
    assert rows(serve, "deployments") == rows(serve, "trainer_jobs") == 0
    assert serve.children() == baseline


def test_lora_rank_above_zero_fails_at_job_creation_and_leaves_nothing(serve):
    baseline = serve.children()
    completed = run_driver(serve, "--lora-rank", "3")
    assert completed.returncode != 0
    assert "service-mode trainer jobs are full-parameter only: set loraRank = 0" in completed.stderr
    assert rows(serve, "trainer_jobs") == rows(serve, "deployments") == 0
    assert serve.children() == baseline


def test_corrupted_hot_load_is_refused_and_jobs_survive_a_restart(tmp_path, anvil_home):
    serve = start_serve(tmp_path, tmp_path / "state")
    try:
        deployments = fw.DeploymentManager(api_key=KEY, base_url=serve.base_url)
        deployments.create_or_get(fw.DeploymentConfig(deployment_id="serving", base_model="anvil-tiny"))
        deployments.wait_for_ready("serving")
        trainers = fw.TrainerJobManager(api_key=KEY, base_url=serve.base_url)
        endpoint = trainers.create_and_wait(fw.TrainerJobConfig(base_model="anvil-tiny", lora_rank=0))
        service = fw.FiretitanServiceClient(base_url=endpoint.base_url, api_key=KEY)
        policy = service.create_training_client(base_model="anvil-tiny", lora_rank=0)
        data = [fw.Datum(model_input=fw.ModelInput.from_ints(PROMPT[:-1]),
                         loss_fn_inputs={"target_tokens": PROMPT[1:], "weights": [1.0] * 4})]  # fmt: skip
        syncer = fw.WeightSyncer(policy_client=policy, deploy_mgr=deployments, deployment_id="serving",
                                 base_model="anvil-tiny")  # fmt: skip
        good = syncer.save_and_hotload("good")
        sampler = fw.FiretitanSamplingClient(syncer.get_deployment_sampler())
        served_before = sampler.compute_logprobs(fw.ModelInput.from_ints(PROMPT)).result()

        policy.forward_backward(data, "cross_entropy").result()
        policy.optim_step(fw.AdamParams(learning_rate=1e-2)).result()
        bad = syncer.save_only("bad", checkpoint_type="base")
        weights = serve.state_dir / "service_mode" / "snapshots" / bad / "model.safetensors"
        raw = bytearray(weights.read_bytes())
        raw[-100] ^= 0xFF  # one flipped byte in a tensor
        weights.write_bytes(bytes(raw))
        assert syncer.hotload(bad, "base") is False  # refused: the digest does not match
        assert "stage=error" in (deployments.last_hotload_error_message or "")
        assert "digest" in hot_load_status(serve, "serving")[0]["loading_state"]["message"]
        served_after = sampler.compute_logprobs(fw.ModelInput.from_ints(PROMPT)).result()
        assert served_after == served_before  # bit-identical: still the previous snapshot
        assert served_identity(serve, "serving") == good
        sampler.close()
        trained = policy.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data
    finally:
        assert serve.stop() == 0
    port = serve.base_url.rsplit(":", 1)[1]

    # a restart brings the deployment (serving the same snapshot) and the job back, and the job's training
    # client with it: the same weights (its durable state), and it trains on
    serve = start_serve(tmp_path, tmp_path / "state", f"port={port}")
    try:
        deployments = fw.DeploymentManager(api_key=KEY, base_url=serve.base_url)
        deployments.wait_for_ready("serving")
        assert deployments.get("serving").state == "READY"
        assert served_identity(serve, "serving") == good
        trainers = fw.TrainerJobManager(api_key=KEY, base_url=serve.base_url)
        assert trainers.get(endpoint.job_id)["state"] == "JOB_STATE_RUNNING"
        assert policy.forward(data, "cross_entropy").result().loss_fn_outputs[0]["logprobs"].data == trained
        policy.forward_backward(data, "cross_entropy").result()
        assert policy.optim_step(fw.AdamParams(learning_rate=1e-2)).result() is not None
        service.close()
        sampler = fw.FiretitanSamplingClient(
            fw.DeploymentSampler(inference_url=serve.base_url, model="accounts/anvil/deployments/serving", api_key=KEY)
        )
        assert sampler.compute_logprobs(fw.ModelInput.from_ints(PROMPT)).result() == served_before
        sampler.close()
        check_stainless_completions(serve, "accounts/anvil/deployments/serving")
        with_job = serve.children()
        trainers.delete(endpoint.job_id)
        deployments.delete("serving")
        assert len(serve.children()) == len(with_job) - 2  # the job's learner and the deployment's replica
    finally:
        assert serve.stop() == 0


def check_stainless_completions(serve, model: str) -> None:
    """`Fireworks().completions.create`, streaming and not, goes to /v1/completions with token ids."""
    from fireworks import Fireworks

    client = Fireworks(api_key=KEY, base_url=serve.base_url, account_id="anvil")
    plain = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, logprobs=True, raw_output=True)
    choice = plain.to_dict()["choices"][0]
    tokens = choice["raw_output"]["completion_token_ids"]
    assert 0 < len(tokens) <= 3 and len(choice["logprobs"]["content"]) == len(tokens)
    assert choice["finish_reason"] in ("stop", "length")
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=3, stream=True, raw_output=True))
    assert any(chunk.to_dict()["choices"] and chunk.to_dict()["choices"][0].get("finish_reason") for chunk in streamed)
