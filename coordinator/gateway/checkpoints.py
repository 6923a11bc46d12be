"""Tinker checkpoint paths and the records behind them, kept in `<state_dir>/checkpoints.jsonl`.

A path is `tinker://<training_run_id>/<kind>/<name>` with exactly three segments (the SDK splits on
'/'): kind `weights` is a training state (model + AdamW, from save_state), `sampler_weights` is
weights only (servable), `external_weights` is a Hugging Face model directory for download
(save_weights_external; coordinator.gateway.external_weights signs its URLs). The record maps a path
to a directory on disk, so a checkpoint outlives the session and the gateway process that made it.

A checkpoint is its run's tenant's (`owner`): to any other tenant it is NOT_FOUND and unlisted, unless
it is published (`public`), which lets any tenant read it (load, sample, download, copy) but never change
or delete it. Records from before tenants belong to tenant "". A checkpoint with a TTL (`expires_at`)
is gone at that time: no longer visible, and its directory deleted by the next sweep (`take_expired`).
"""

from __future__ import annotations

import datetime
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from coordinator.gateway import tenancy
from coordinator.gateway.lora import lora_of_checkpoint, tinker_fields
from protos.errors import FailedPrecondition, InvalidArgument, NotFound

KIND_TO_TYPE = {"weights": "training", "sampler_weights": "sampler", "external_weights": "external"}
TTL_RANGE_S = (3600, 10 * 365 * 24 * 3600)
"""Tinker's bounds on a checkpoint's TTL: one hour to ten years."""


def tinker_path(run_id: str, kind: str, name: str) -> str:
    return f"tinker://{run_id}/{kind}/{name}"


def parse_tinker_path(path: str) -> tuple[str, str, str]:
    """(training_run_id, kind, name); InvalidArgument for anything else."""
    parts = path.removeprefix("tinker://").split("/") if path.startswith("tinker://") else []
    if len(parts) != 3 or parts[1] not in KIND_TO_TYPE or not all(parts):
        raise InvalidArgument(
            f"{path!r} is not a checkpoint path; expected tinker://<run_id>/<kind>/<name> with kind "
            "weights, sampler_weights or external_weights"
        )
    return parts[0], parts[1], parts[2]


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def iso_time(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).isoformat()


@dataclass
class CheckpointRecord:
    path: str
    """The tinker:// path."""
    run_id: str
    kind: str
    name: str
    local_path: str
    """The directory holding it (the learner's, or the gateway's for a copy)."""
    base_model: str
    time: str
    size_bytes: int
    owner: str = ""
    """The tenant of the run that saved it."""
    expires_at: str | None = None
    """ISO time it is deleted at (its TTL); None keeps it for good."""
    public: bool = False
    """Published: readable by every tenant."""
    user_metadata: dict[str, Any] | None = None

    def expired(self, now_unix_s: float) -> bool:
        if self.expires_at is None:
            return False
        return datetime.datetime.fromisoformat(self.expires_at).timestamp() <= now_unix_s

    def to_tinker(self) -> dict:
        return {
            "checkpoint_id": f"{self.kind}/{self.name}",
            "checkpoint_type": KIND_TO_TYPE[self.kind],
            "time": self.time,
            "tinker_path": self.path,
            "size_bytes": self.size_bytes,
            "public": self.public,
            "expires_at": self.expires_at,
            "user_metadata": self.user_metadata,
        }

    def weights_info(self) -> dict:
        """Tinker's `weights_info` answer: what a training client loading this checkpoint is built on."""
        return {
            "base_model": self.base_model,
            **tinker_fields(lora_of_checkpoint(Path(self.local_path))),
            "optimizer_config": {"type": "adamw"},
        }


class CheckpointStore:
    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = state_dir
        self.clock = clock
        """Unix seconds; tests move it to expire checkpoints."""
        self._file = state_dir / "checkpoints.jsonl"
        self._records: dict[str, CheckpointRecord] = {}
        if self._file.exists():
            for line in self._file.read_text().splitlines():
                entry = json.loads(line)
                if entry.pop("deleted", False):
                    self._records.pop(entry["path"], None)
                else:
                    self._records[entry["path"]] = CheckpointRecord(**entry)

    def expiry(self, ttl_seconds: int | None) -> str | None:
        """The ISO expiry of a checkpoint given `ttl_seconds` from now (None: never); InvalidArgument out
        of Tinker's range, checked before any work is done."""
        if ttl_seconds is None:
            return None
        low, high = TTL_RANGE_S
        if not low <= ttl_seconds <= high:
            raise InvalidArgument(
                f"ttl_seconds {ttl_seconds} is out of range; give {low} (1 hour) to {high} (10 years), or null"
            )
        return iso_time(self.clock() + ttl_seconds)

    def add(
        self,
        run_id: str,
        kind: str,
        name: str,
        local_path: str,
        base_model: str,
        owner: str,
        ttl_seconds: int | None = None,
        user_metadata: dict[str, Any] | None = None,
    ) -> CheckpointRecord:
        expires_at = self.expiry(ttl_seconds)
        size = sum(p.stat().st_size for p in Path(local_path).rglob("*") if p.is_file())
        record = CheckpointRecord(
            tinker_path(run_id, kind, name), run_id, kind, name, local_path, base_model, iso_time(self.clock()), size,
            owner, expires_at, False, user_metadata or None,
        )  # fmt: skip
        self._put(record)
        return record

    def get(self, path: str) -> CheckpointRecord:
        """A checkpoint the caller may read: its own or a published one."""
        parse_tinker_path(path)
        record = self._live().get(path)
        if record is None or not (tenancy.owns(record.owner) or record.public) or not Path(record.local_path).is_dir():
            raise NotFound(f"no checkpoint {path}; list them with GET /api/v1/training_runs/<run_id>/checkpoints")
        return record

    def owned(self, path: str) -> CheckpointRecord:
        """A checkpoint the caller may change or delete: its own only."""
        record = self.get(path)
        if not tenancy.owns(record.owner):
            raise FailedPrecondition(f"{path} is published by another tenant; only its owner can change or delete it")
        return record

    def unscoped(self, path: str) -> CheckpointRecord | None:
        """The live record of `path` whoever asks (for a signed download URL, which carries no tenant)."""
        return self._live().get(path)

    def of_run(self, run_id: str) -> list[CheckpointRecord]:
        return [r for r in self._visible().values() if r.run_id == run_id]

    def all(self) -> list[CheckpointRecord]:
        return list(self._visible().values())

    def _live(self) -> dict[str, CheckpointRecord]:
        """Records not past their expiry."""
        now = self.clock()
        return {p: r for p, r in self._records.items() if not r.expired(now)}

    def _visible(self) -> dict[str, CheckpointRecord]:
        """The caller's live records (coordinator.gateway.tenancy)."""
        return {path: r for path, r in self._live().items() if tenancy.owns(r.owner)}

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

    def set_ttl(self, path: str, ttl_seconds: int | None) -> CheckpointRecord:
        """Expire the caller's checkpoint `ttl_seconds` from now, or never (None)."""
        return self._put(replace(self.owned(path), expires_at=self.expiry(ttl_seconds)))

    def set_public(self, path: str, public: bool) -> CheckpointRecord:
        return self._put(replace(self.owned(path), public=public))

    def delete(self, path: str) -> None:
        record = self.owned(path)
        shutil.rmtree(record.local_path, ignore_errors=True)
        self._forget(path)

    def take_expired(self) -> list[str]:
        """Forget the checkpoints past their TTL; returns their directories, for the caller to delete (off
        the event loop: a checkpoint can be large)."""
        live = self._live()
        expired = [r for path, r in self._records.items() if path not in live]
        for record in expired:
            self._forget(record.path)
        return [r.local_path for r in expired]

    def _put(self, record: CheckpointRecord) -> CheckpointRecord:
        self._records[record.path] = record
        self._append(asdict(record))
        return record

    def _forget(self, path: str) -> None:
        del self._records[path]
        self._append({"path": path, "deleted": True})

    def _append(self, entry: dict) -> None:
        with self._file.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")
