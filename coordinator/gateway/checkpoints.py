"""Tinker checkpoint paths and the records behind them, kept in `<state_dir>/checkpoints.jsonl`.

A path is `tinker://<training_run_id>/<kind>/<name>` with exactly three segments (the SDK splits on
'/'): kind `weights` is a training state (model + AdamW, from save_state), `sampler_weights` is
weights only (servable). The record maps a path to the learner's directory, so a checkpoint outlives
the session and the gateway process that made it. A checkpoint is its run's tenant's (`owner`): to any
other tenant it is NOT_FOUND and unlisted; records from before tenants belong to tenant "".
"""

from __future__ import annotations

import datetime
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from coordinator.gateway import tenancy
from protos.errors import InvalidArgument, NotFound

KIND_TO_TYPE = {"weights": "training", "sampler_weights": "sampler"}


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(training_run_id, kind, name); InvalidArgument for anything else."""
    parts = path.removeprefix("tinker://").split("/") if path.startswith("tinker://") else []
    if len(parts) != 3 or parts[1] not in KIND_TO_TYPE or not all(parts):
        raise InvalidArgument(
            f"{path!r} is not a checkpoint path; expected tinker://<run_id>/weights/<name> or "
            "tinker://<run_id>/sampler_weights/<name>"
        )
    return parts[0], parts[1], parts[2]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


@dataclass
class CheckpointRecord:
    path: str
    """The tinker:// path."""
    run_id: str
    kind: str
    name: str
    local_path: str
    """The learner's directory for it."""
    base_model: str
    time: str
    size_bytes: int
    owner: str = ""
    """The tenant of the run that saved it."""

    def to_tinker(self) -> dict:
        return {
            "checkpoint_id": f"{self.kind}/{self.name}",
            "checkpoint_type": KIND_TO_TYPE[self.kind],
            "time": self.time,
            "tinker_path": self.path,
            "size_bytes": self.size_bytes,
            "public": False,
            "expires_at": None,
        }

    def weights_info(self) -> dict:
        """Tinker's `weights_info` answer: what a training client loading this checkpoint is built on."""
        return {
            "base_model": self.base_model,
            "is_lora": False,
            "lora_rank": None,
            "optimizer_config": {"type": "adamw"},
        }


class CheckpointStore:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._file = state_dir / "checkpoints.jsonl"
        self._records: dict[str, CheckpointRecord] = {}
        if self._file.exists():
            for line in self._file.read_text().splitlines():
                entry = json.loads(line)
                if entry.pop("deleted", False):
                    self._records.pop(entry["path"], None)
                else:
                    self._records[entry["path"]] = CheckpointRecord(**entry)

    def add(self, run_id: str, kind: str, name: str, local_path: str, base_model: str, owner: str) -> CheckpointRecord:
        size = sum(p.stat().st_size for p in Path(local_path).rglob("*") if p.is_file())
        record = CheckpointRecord(
            tinker_path(run_id, kind, name), run_id, kind, name, local_path, base_model, utc_now(), size, owner
        )
        self._records[record.path] = record
        self._append(asdict(record))
        return record

    def get(self, path: str) -> CheckpointRecord:
        parse_tinker_path(path)
        record = self._visible().get(path)
        if record is None or not Path(record.local_path).is_dir():
            raise NotFound(f"no checkpoint {path}; list them with GET /api/v1/training_runs/<run_id>/checkpoints")
        return record

    def of_run(self, run_id: str) -> list[CheckpointRecord]:
        return [r for r in self._visible().values() if r.run_id == run_id]

    def all(self) -> list[CheckpointRecord]:
        return list(self._visible().values())

    def _visible(self) -> dict[str, CheckpointRecord]:
        """The caller's records (coordinator.gateway.tenancy)."""
        return {path: r for path, r in self._records.items() if tenancy.owns(r.owner)}

    def resolve_state(self, path: str, model_id: str | None) -> str:
        """The tinker:// path of a training state. A tinker:// path is returned as is; a bare name (what
        Fireworks' clients save and load by) is `model_id`'s state of that name, else the newest of any run."""
        if path.startswith("tinker://"):
            return path
        if path.startswith("cross_job://"):
            raise InvalidArgument(f"{path}: cross-job checkpoint references are not supported; load by name")
        visible = self._visible()
        if model_id is not None:
            own = tinker_path(model_id, "weights", path)
            if own in visible:
                return own
        named = [r for r in visible.values() if r.kind == "weights" and r.name == path]
        if not named:
            raise NotFound(f"no checkpoint named {path!r}; list them with list_checkpoints")
        return named[-1].path

    def state_names(self) -> list[str]:
        """Names of the training states (Fireworks' `list_checkpoints`)."""
        return sorted({r.name for r in self._visible().values() if r.kind == "weights"})

    def delete(self, path: str) -> None:
        record = self.get(path)
        shutil.rmtree(record.local_path, ignore_errors=True)
        del self._records[path]
        self._append({"path": path, "deleted": True})

    def _append(self, entry: dict) -> None:
        with self._file.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
