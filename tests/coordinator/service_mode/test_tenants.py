"""Tenants in service mode: Alice's RLOR trainer job and deployment are invisible to Bob (another key of
the same `anvil serve`) on every control-plane route and on the job's own Tinker routes; Alice's keep
running and she deletes them afterwards."""

from __future__ import annotations

import httpx
import pytest

from tests.coordinator.service_mode.conftest import KEY, OTHER_TENANT_KEY

pytest.importorskip("fireworks.training.sdk", reason="fireworks-ai[training-sdk]==1.2.30 is a dev dependency")

ACCOUNT = "/v1/accounts/anvil"


def test_another_tenant_cannot_see_or_touch_alices_job_and_deployment(serve):
    alice = httpx.Client(base_url=serve.base_url, headers={"X-API-Key": KEY}, timeout=300)
    bob = httpx.Client(base_url=serve.base_url, headers={"Authorization": f"Bearer {OTHER_TENANT_KEY}"}, timeout=60)
    job_body = {"trainingConfig": {"baseModel": "anvil-tiny", "loraRank": 0}}
    job = alice.post(f"{ACCOUNT}/rlorTrainerJobs", params={"rlorTrainerJobId": "alice-job"}, json=job_body)
    deployment_body = {"baseModel": "anvil-tiny", "minReplicaCount": 1, "maxReplicaCount": 1}
    deployment = alice.post(f"{ACCOUNT}/deployments", params={"deploymentId": "alice-dep"}, json=deployment_body)
    try:
        assert job.status_code == 200 and job.json()["state"] == "JOB_STATE_RUNNING", job.text
        assert deployment.status_code == 200 and deployment.json()["state"] == "READY", deployment.text
        trainer = "/training/v1/rlorTrainerJobs/anvil/alice-job/api/v1"
        assert alice.get(f"{trainer}/get_server_capabilities").status_code == 200
        on_deployment = {"fireworks-deployment": "accounts/anvil/deployments/alice-dep"}
        not_found = {
            "get job": bob.get(f"{ACCOUNT}/rlorTrainerJobs/alice-job"),
            "resume job": bob.post(f"{ACCOUNT}/rlorTrainerJobs/alice-job:resume"),
            "delete job": bob.delete(f"{ACCOUNT}/rlorTrainerJobs/alice-job"),
            "the job's Tinker routes": bob.get(f"{trainer}/get_server_capabilities"),
            "get deployment": bob.get(f"{ACCOUNT}/deployments/alice-dep"),
            "delete deployment": bob.delete(f"{ACCOUNT}/deployments/alice-dep"),
            "hot-load status": bob.get("/hot_load/v1/models/hot_load", headers=on_deployment),
            "hot-load": bob.post("/hot_load/v1/models/hot_load", headers=on_deployment, json={"identity": "x"}),
            "completions": bob.post(
                "/inference/v1/completions", json={"model": "accounts/anvil/deployments/alice-dep", "prompt": "Hi"}
            ),
        }
        for route, answer in not_found.items():
            assert answer.status_code == 404, (route, answer.status_code, answer.text)
        taken = bob.post(f"{ACCOUNT}/rlorTrainerJobs", params={"rlorTrainerJobId": "alice-job"}, json=job_body)
        assert taken.status_code == 409 and "already exists" in taken.text  # one account's names are global
        unknown = httpx.get(f"{serve.base_url}{trainer}/get_server_capabilities", headers={"X-API-Key": "fw-nobody"})
        assert unknown.status_code == 401

        # Alice's are untouched
        assert alice.get(f"{ACCOUNT}/rlorTrainerJobs/alice-job").json()["state"] == "JOB_STATE_RUNNING"
        assert alice.get(f"{ACCOUNT}/deployments/alice-dep").json()["state"] == "READY"
        assert alice.get(f"{trainer}/get_server_capabilities").status_code == 200
    finally:
        alice.delete(f"{ACCOUNT}/rlorTrainerJobs/alice-job")
        alice.delete(f"{ACCOUNT}/deployments/alice-dep")
        alice.close()
        bob.close()
