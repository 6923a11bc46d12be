"""A deployment's replicas are a supervised fleet: with two replicas serving a hot-loaded snapshot, one
is killed (kill -9); completions go on on the other, the killed one is restarted, resynced to the
snapshot the deployment serves (not the base model it starts with) and takes traffic again, with the
same logprobs as before; nothing of the killed replica's process is left."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.coordinator.conftest import wait
from tests.coordinator.service_mode.conftest import KEY, start_serve, trained_policy

fw = pytest.importorskip("fireworks.training.sdk", reason="fireworks-ai[training-sdk]==1.2.30 is a dev dependency")

PROMPT = [4, 40, 405, 226, 28]
FLEET = ("services.fleet.probe_interval_s=0.5", "services.fleet.failures_to_dead=2",
         "services.fleet.restart_backoff_s=0.5")  # fmt: skip


def replica_pid(state_dir: Path, deployment_id: str, index: int) -> int | None:
    """The replica process whose output goes to its log (`deployment-<id>-<index>.log`), if one runs."""
    log = state_dir / "service_mode" / "logs" / f"deployment-{deployment_id}-{index}.log"
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.readlink(proc / "fd" / "1") == str(log):
                    return int(proc.name)
            except OSError:
                continue
    return None


def hot_load_status(base_url: str, deployment_id: str) -> list[dict]:
    headers = {"X-Api-Key": KEY, "fireworks-deployment": f"accounts/anvil/deployments/{deployment_id}"}
    return httpx.get(f"{base_url}/hot_load/v1/models/hot_load", headers=headers).json()["replicas"]


def complete(base_url: str, deployment_id: str) -> dict:
    body = {"model": f"accounts/anvil/deployments/{deployment_id}", "prompt": PROMPT, "max_tokens": 2}
    reply = httpx.post(f"{base_url}/inference/v1/completions", json=body, headers={"X-Api-Key": KEY}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()


@pytest.mark.integration
def test_a_killed_deployment_replica_is_restarted_at_the_served_snapshot(tmp_path: Path, anvil_home: Path):
    serve = start_serve(tmp_path, tmp_path / "state", *FLEET)
    try:
        deployments = fw.DeploymentManager(api_key=KEY, base_url=serve.base_url)
        deployments.create_or_get(
            fw.DeploymentConfig(deployment_id="pair", base_model="anvil-tiny", min_replica_count=2, max_replica_count=2)
        )
        deployments.wait_for_ready("pair")
        trainers, endpoint, service, policy, data = trained_policy(serve, PROMPT, learning_rate=1e-2)
        syncer = fw.WeightSyncer(policy_client=policy, deploy_mgr=deployments, deployment_id="pair",
                                 base_model="anvil-tiny")  # fmt: skip
        trained = syncer.save_and_hotload("trained")
        sampler = fw.FiretitanSamplingClient(syncer.get_deployment_sampler())
        base = [None, *policy.forward([data[0]], "cross_entropy").result().loss_fn_outputs[0]["logprobs"].tolist()]
        served = [sampler.compute_logprobs(fw.ModelInput.from_ints(PROMPT)).result() for _ in range(4)]
        assert all(logprobs == served[0] for logprobs in served)  # both replicas serve the same weights
        assert served[0][1:] == pytest.approx(base[1:], abs=1e-4)  # and they are the trained ones
        assert [(r["current_snapshot_identity"], r["readiness"]) for r in hot_load_status(serve.base_url, "pair")] == [
            (trained, True),
            (trained, True),
        ]

        killed = replica_pid(serve.state_dir, "pair", 1)
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        for _ in range(6):  # the deployment keeps answering on the other replica
            assert complete(serve.base_url, "pair")["choices"]

        def resynced() -> bool:
            if replica_pid(serve.state_dir, "pair", 1) in (None, killed):
                return False
            replicas = hot_load_status(serve.base_url, "pair")
            return all(r["readiness"] and r["current_snapshot_identity"] == trained for r in replicas)

        wait(resynced, "replica 1 to be restarted and resynced", timeout_s=180)
        assert not Path(f"/proc/{killed}").exists() or "Z" in Path(f"/proc/{killed}/stat").read_text().split()[2]
        after = [sampler.compute_logprobs(fw.ModelInput.from_ints(PROMPT)).result() for _ in range(4)]
        assert after == served  # the restarted replica serves the trained snapshot, not the base model
        sampler.close()
        service.close()
        baseline = serve.children()
        trainers.delete(endpoint.job_id)
        deployments.delete("pair")
        assert len(serve.children()) == len(baseline) - 3  # the job's learner and both replicas
    finally:
        assert serve.stop() == 0
