"""RLOR trainer jobs in service mode: each job is a learner process of its own, reached through the
gateway prefix `/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/...`, where it speaks the Tinker REST
API: the same gateway as `anvil serve`'s own, bound to this job's learner, with sampler snapshots going
to the shared snapshot store so a deployment can hot-load them, and in the `fireworks` dialect (bare
checkpoint names), since only Fireworks' training SDK reaches a trainer job."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from coordinator.gateway.app import create_app
from coordinator.gateway.config import GatewayConfig
from coordinator.gateway.service import TinkerService
from coordinator.gateway.snapshot_store import SnapshotStore
from coordinator.launcher import ServiceProcess
from coordinator.services import start_learner_process
from protos.channels import open_channel


@dataclass
class TrainerJobRuntime:
    job_id: str
    process: ServiceProcess
    service: TinkerService
    app: FastAPI
    expiry: asyncio.Task

    @classmethod
    async def start(
        cls,
        job_id: str,
        model_name: str,
        model_dir: Path,
        job_dir: Path,
        gateway: GatewayConfig,
        snapshots: SnapshotStore,
        env: dict[str, str],
        api_key: str | None,
    ) -> TrainerJobRuntime:
        process = await start_learner_process(
            f"trainer-{job_id}",
            job_dir / "learner",
            gateway.services.learner_backend,
            (f"max_sessions={gateway.learner_max_sessions}",),
            job_dir / "logs",
            env,
            gateway.services.startup_timeout_s,
        )
        # Trainer jobs are full-parameter whatever the server's gateway allows (lora_max_rank 0).
        update = {"model": model_name, "state_dir": job_dir / "gateway", "dialect": "fireworks", "lora_max_rank": 0}
        config = gateway.model_copy(update=update)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        channel = open_channel(process.address, api_key=api_key)
        service = TinkerService(config, channel, str(model_dir), model_dir, router=None, snapshots=snapshots)
        await service.restore()
        app = create_app(service, gateway.resolved_api_keys())
        expiry = asyncio.get_running_loop().create_task(service.sessions.expire_forever(config.session_timeout_s))
        return cls(job_id, process, service, app, expiry)

    async def stop(self, finish_sessions: bool) -> None:
        """Stop the job's learner; its sessions end (`finish_sessions`: the job was deleted) or are
        suspended, to be restored when the job comes back up (the server stops)."""
        self.expiry.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.expiry
        if finish_sessions:
            await self.service.sessions.finish_all("the trainer job stopped")
        else:
            await self.service.suspend("the trainer job stopped")
        await self.service.learner_channel.close()
        await asyncio.to_thread(self.process.stop)
