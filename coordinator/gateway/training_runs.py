"""Training-run records: one per training client ever created, appended to `<state_dir>/training_runs.jsonl`.

Tinker lists training runs (`training_runs`, `training_runs/{id}`) long after the session - or the
gateway process - that made them is gone, together with their last checkpoints; so a run is recorded
when its training client is created and described from the record, the checkpoint store and, while it
is live, the training client itself. A run is its creator's (the record's `owner`, a tenant): other
tenants neither list it nor find it. Records from before tenants belong to tenant "" (a keyless gateway).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coordinator.gateway import tenancy
from coordinator.gateway.checkpoints import CheckpointStore, utc_now
from coordinator.gateway.lora import tinker_fields
from coordinator.gateway.sessions import TrainingModel
from protos.errors import NotFound


class TrainingRuns:
    def __init__(self, state_dir: Path) -> None:
        self._file = state_dir / "training_runs.jsonl"
        self._runs: dict[str, dict[str, Any]] = {}
        if self._file.exists():
            for line in self._file.read_text().splitlines():
                run = json.loads(line)
                self._runs[run["training_run_id"]] = run

    def add(
        self, run_id: str, base_model: str, user_metadata: dict[str, str], owner: str, lora: dict | None = None
    ) -> None:
        run = {"training_run_id": run_id, "base_model": base_model, "user_metadata": user_metadata, "owner": owner}
        run["lora"] = lora
        self._runs[run_id] = run
        with self._file.open("a") as handle:
            handle.write(json.dumps(run) + "\n")

    def known(self, run_id: str) -> bool:
        """Whether any tenant has a run `run_id` (ids are global, so a new one must not reuse it)."""
        return run_id in self._runs

    def ids(self) -> list[str]:
        """The caller's run ids, oldest first."""
        return [run_id for run_id, run in self._runs.items() if tenancy.owns(run.get("owner", ""))]

    def describe(self, run_id: str, checkpoints: CheckpointStore, live: TrainingModel | None) -> dict[str, Any]:
        """Tinker's TrainingRun for `run_id`; `live` is its training client while one is open."""
        run = self._runs.get(run_id)
        if run is None or not tenancy.owns(run.get("owner", "")):
            raise NotFound(f"no training run {run_id!r}")
        saved = checkpoints.of_run(run_id)
        last = {kind: [c for c in saved if c.kind == kind] for kind in ("weights", "sampler_weights")}
        return {
            "training_run_id": run_id,
            "base_model": run["base_model"],
            "model_owner": "anvil",
            "corrupted": False,
            **tinker_fields(run.get("lora")),
            "last_request_time": live.last_request_time if live else (saved[-1].time if saved else utc_now()),
            "last_checkpoint": last["weights"][-1].to_tinker() if last["weights"] else None,
            "last_sampler_checkpoint": last["sampler_weights"][-1].to_tinker() if last["sampler_weights"] else None,
            "user_metadata": run.get("user_metadata") or None,
        }
