"""The control plane: one account, deployments and RLOR trainer jobs, their processes, and restart.

Every change is written to the ResourceStore first; processes follow the rows. `restore()` (at
`anvil serve` start) brings back every deployment and job that was live, and re-hot-loads the snapshot
each deployment served. Deleting a resource stops its processes and removes its row.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from typing import Any

from coordinator.gateway import tenancy
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.models import model_name_of, resolve_model
from coordinator.service_mode.deployments import DeploymentRuntime
from coordinator.service_mode.jobs import TrainerJobRuntime
from coordinator.service_mode.store import OWNER, ResourceStore
from coordinator.services import service_env
from protos.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger(__name__)
ACCOUNT = "anvil"
DEPLOYMENTS, JOBS = "deployments", "trainer_jobs"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class ServiceMode:
    def __init__(self, gateway: GatewayConfig, services_api_key: str | None) -> None:
        self.gateway = gateway
        self.root = gateway.state_dir / "service_mode"
        self.store = ResourceStore(self.root / "resources.sqlite")
        self.snapshots = SnapshotStore(self.root / "snapshots")
        self.api_key = services_api_key
        self.env = service_env(services_api_key)
        self.deployments: dict[str, DeploymentRuntime] = {}
        self.jobs: dict[str, TrainerJobRuntime] = {}
        self._tasks: set[asyncio.Task] = set()

    def _background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- deployments ---------------------------------------------------------------------------------

    def get_deployment(self, deployment_id: str) -> dict[str, Any]:
        doc = self.store.get_own(DEPLOYMENTS, deployment_id)
        if doc is None:
            raise NotFound(f"deployment {deployment_id!r} not found")
        runtime = self.deployments.get(deployment_id)
        if runtime is not None:
            doc["currentSnapshotIdentity"] = runtime.current_identity
            doc["replicaAddresses"] = runtime.replicas.addresses
        return doc

    def create_deployment(self, deployment_id: str, body: dict[str, Any]) -> dict[str, Any]:
        if not deployment_id or "/" in deployment_id:
            raise InvalidArgument("deploymentId must be a non-empty name without '/'")
        if self.store.get(DEPLOYMENTS, deployment_id) is not None:
            raise FailedPrecondition(f"deployment {deployment_id!r} already exists")
        model = model_name_of(str(body.get("baseModel", "")))
        resolve_model(model)  # an unknown model is a 400 now, not a FAILED deployment later
        doc = {
            **body,
            "name": f"accounts/{ACCOUNT}/deployments/{deployment_id}",
            "state": "CREATING",
            "createTime": _now(),
            "currentSnapshotIdentity": None,
            OWNER: tenancy.current(),
        }
        self.store.put(DEPLOYMENTS, deployment_id, doc)
        self._background(self._bring_up_deployment(deployment_id))
        return doc

    async def settle(self, seconds: float = 30.0) -> None:
        """Wait up to `seconds` for background starts, so a create usually answers READY / RUNNING and
        the SDK's first status poll finds it ready (its poll interval is 5-15 s)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=seconds)

    async def _bring_up_deployment(self, deployment_id: str) -> None:
        doc = self.store.get(DEPLOYMENTS, deployment_id)
        model = model_name_of(doc["baseModel"])
        try:
            runtime = await DeploymentRuntime.start(
                deployment_id,
                model,
                resolve_model(model),
                max(1, int(doc.get("maxReplicaCount") or 1), int(doc.get("minReplicaCount") or 1)),
                list(doc.get("anvilRolloutAddresses") or []),
                self.gateway.services.rollout_engine.model_dump(exclude_none=True),
                self.root / "logs",
                self.env,
                self.api_key,
                self.gateway.services.startup_timeout_s,
                self.gateway.services.fleet,
            )
        except Exception as exc:
            log.exception("deployment %s failed to start", deployment_id)
            if self.store.get(DEPLOYMENTS, deployment_id) is not None:
                self.store.put(DEPLOYMENTS, deployment_id, {**doc, "state": "FAILED", "statusMessage": str(exc)})
            return
        if self.store.get(DEPLOYMENTS, deployment_id) is None:  # deleted while starting
            await runtime.stop()
            return
        self.deployments[deployment_id] = runtime
        if doc.get("currentSnapshotIdentity"):  # restored after a restart: serve what it served
            await runtime.hot_load(doc["currentSnapshotIdentity"], self.snapshots, None)
        self.store.put(DEPLOYMENTS, deployment_id, {**doc, "state": "READY"})

    async def delete_deployment(self, deployment_id: str) -> None:
        if self.store.get_own(DEPLOYMENTS, deployment_id) is None:
            raise NotFound(f"deployment {deployment_id!r} not found")
        self.store.delete(DEPLOYMENTS, deployment_id)
        runtime = self.deployments.pop(deployment_id, None)
        if runtime is not None:
            await runtime.stop()

    def ready_deployment(self, deployment_id: str) -> DeploymentRuntime:
        doc = self.store.get_own(DEPLOYMENTS, deployment_id)
        if doc is None:
            raise NotFound(f"deployment {deployment_id!r} not found")
        runtime = self.deployments.get(deployment_id)
        if runtime is None:
            state = doc.get("state")
            raise FailedPrecondition(f"deployment {deployment_id!r} is {state}, not READY")
        return runtime

    async def hot_load(self, deployment_id: str, identity: str, metadata: dict | None) -> None:
        runtime = self.ready_deployment(deployment_id)
        self.snapshots.meta(identity, tenancy.current())  # NOT_FOUND now for an unknown (or another's) snapshot
        previous = (metadata or {}).get("previous_snapshot_identity")
        if previous and self.snapshots.exists(previous):  # a delta's base: never another tenant's
            self.snapshots.meta(previous, tenancy.current())
        runtime.loading = {"stage": "loading", "target_snapshot_identity": identity}

        async def load() -> None:
            await runtime.hot_load(identity, self.snapshots, previous)
            doc = self.store.get(DEPLOYMENTS, deployment_id)
            if doc is not None:
                self.store.put(DEPLOYMENTS, deployment_id, {**doc, "currentSnapshotIdentity": runtime.current_identity})

        task = asyncio.get_running_loop().create_task(load())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # Answer when done if that is soon (the SDK's first status poll then finds it loaded, no 5 s
        # sleep); a long load goes on in the background and the status reports it.
        await asyncio.wait([task], timeout=30)

    # --- trainer jobs --------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> dict[str, Any]:
        doc = self.store.get_own(JOBS, job_id)
        if doc is None:
            raise NotFound(f"RLOR trainer job {job_id!r} not found")
        return doc

    def create_job(self, job_id: str, body: dict[str, Any], deployment_id: str | None) -> dict[str, Any]:
        if not job_id or "/" in job_id:
            raise InvalidArgument("rlorTrainerJobId must be a non-empty name without '/'")
        training = body.get("trainingConfig") or {}
        rank = int(training.get("loraRank") or 0)
        if body.get("serviceMode") and rank > 0:
            raise InvalidArgument(
                f"trainingConfig.loraRank is {rank}, but service-mode trainer jobs are full-parameter only: "
                "set loraRank = 0"
            )
        if rank > 0:
            raise InvalidArgument(f"trainingConfig.loraRank is {rank}; Anvil trains full-parameter only: set it to 0")
        model = model_name_of(str(training.get("baseModel", "")))
        resolve_model(model)
        if self.store.get(JOBS, job_id) is not None:
            raise FailedPrecondition(f"RLOR trainer job {job_id!r} already exists")
        doc = {
            **body,
            "name": f"accounts/{ACCOUNT}/rlorTrainerJobs/{job_id}",
            "state": "JOB_STATE_CREATING",
            "createTime": _now(),
            OWNER: tenancy.current(),
        }
        if deployment_id or body.get("hotLoadDeploymentId"):
            doc["hotLoadDeploymentId"] = deployment_id or body.get("hotLoadDeploymentId")
        self.store.put(JOBS, job_id, doc)
        self._background(self._bring_up_job(job_id))
        return doc

    async def _bring_up_job(self, job_id: str) -> None:
        doc = self.store.get(JOBS, job_id)
        model = model_name_of(doc["trainingConfig"]["baseModel"])
        try:
            runtime = await TrainerJobRuntime.start(
                job_id,
                model,
                resolve_model(model),
                self.root / "jobs" / job_id,
                self.gateway,
                self.snapshots,
                self.env,
                self.api_key,
            )
        except Exception as exc:
            log.exception("trainer job %s failed to start", job_id)
            if self.store.get(JOBS, job_id) is not None:
                self.store.put(JOBS, job_id, {**doc, "state": "JOB_STATE_FAILED", "statusMessage": str(exc)})
            return
        if self.store.get(JOBS, job_id) is None:  # deleted while starting
            await runtime.stop(finish_sessions=True)
            return
        self.jobs[job_id] = runtime
        self.store.put(JOBS, job_id, {**doc, "state": "JOB_STATE_RUNNING"})

    async def resume_job(self, job_id: str) -> dict[str, Any]:
        doc = self.get_job(job_id)
        if job_id not in self.jobs and doc["state"] != "JOB_STATE_CREATING":
            doc = {**doc, "state": "JOB_STATE_CREATING"}
            self.store.put(JOBS, job_id, doc)
            self._background(self._bring_up_job(job_id))
        return doc

    async def delete_job(self, job_id: str) -> None:
        self.get_job(job_id)
        self.store.delete(JOBS, job_id)
        runtime = self.jobs.pop(job_id, None)
        if runtime is not None:
            await runtime.stop(finish_sessions=True)

    # --- lifecycle -----------------------------------------------------------------------------------

    def restore(self) -> None:
        """Bring back what was live before a restart (rows stay; processes are started again)."""
        for doc in self.store.all(DEPLOYMENTS):
            deployment_id = doc["name"].rsplit("/", 1)[-1]
            if doc.get("state") in ("CREATING", "READY"):
                self.store.put(DEPLOYMENTS, deployment_id, {**doc, "state": "CREATING"})
                self._background(self._bring_up_deployment(deployment_id))
        for doc in self.store.all(JOBS):
            job_id = doc["name"].rsplit("/", 1)[-1]
            if doc.get("state") in ("JOB_STATE_CREATING", "JOB_STATE_RUNNING"):
                self.store.put(JOBS, job_id, {**doc, "state": "JOB_STATE_CREATING"})
                self._background(self._bring_up_job(job_id))

    async def stop(self) -> None:
        """Stop every process (rows stay, so a restart brings them back)."""
        for task in list(self._tasks):
            task.cancel()
        for runtime in list(self.jobs.values()):
            await runtime.stop(finish_sessions=False)
        for runtime in list(self.deployments.values()):
            await runtime.stop()
        self.jobs.clear()
        self.deployments.clear()
        self.store.close()
