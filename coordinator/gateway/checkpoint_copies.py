"""`copy_weights`: a checkpoint copied into a new training run, sharing the source's bytes.

Tinker's copy belongs to a new training run that cannot be trained on, keeps the source's kind, does not
inherit its TTL, and shares storage with it. Here the copy's directory is a tree of hard links to the
source's files (a plain copy where the filesystem cannot link): no bytes are duplicated, and either one
can be deleted or expire without the other losing a byte, because checkpoints are written once (the
learner writes a new directory and renames it in, never rewriting a file in place).

The SDK sends one `X-Idempotency-Key` across its retries, so a key already answered returns the same copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from coordinator.gateway import tenancy
from coordinator.gateway.bodies import CopyWeights
from coordinator.gateway.checkpoints import CheckpointStore
from coordinator.gateway.training_runs import TrainingRuns
from protos.errors import AlreadyExists, InvalidArgument

RUN_ID = re.compile(r"[A-Za-z0-9_.:-]+")


class CheckpointCopies:
    def __init__(self, state_dir: Path, checkpoints: CheckpointStore, runs: TrainingRuns) -> None:
        self.checkpoints = checkpoints
        self.runs = runs
        self._root = state_dir / "checkpoint_copies"
        self._answers_file = state_dir / "checkpoint_copies.jsonl"
        self._answers: dict[tuple[str, str], tuple[str, str]] = {}
        """(tenant, idempotency key) → (the request it answered, as JSON; the copy's tinker path)."""
        if self._answers_file.exists():
            for line in self._answers_file.read_text().splitlines():
                entry = json.loads(line)
                self._answers[(entry["owner"], entry["key"])] = (entry["request"], entry["tinker_path"])

    def copy(self, request: CopyWeights, idempotency_key: str | None) -> dict[str, str]:
        owner = tenancy.current()
        asked = request.model_dump_json(exclude={"weights_access_token"})
        if idempotency_key and (owner, idempotency_key) in self._answers:
            answered, path = self._answers[(owner, idempotency_key)]
            if answered != asked:
                raise InvalidArgument(
                    f"X-Idempotency-Key {idempotency_key!r} already answered another copy_weights request; "
                    "use a new key for a new copy"
                )
            return {"tinker_path": path}
        source = self.checkpoints.get(request.source_path)
        self.checkpoints.expiry(request.ttl_seconds)
        run_id = self._new_run_id(request)
        target = self._root / run_id / source.kind / source.name
        _link_tree(Path(source.local_path), target)
        self.runs.add(run_id, source.base_model, {"copied_from": source.path}, owner)
        record = self.checkpoints.add(
            run_id, source.kind, source.name, str(target), source.base_model, owner,
            request.ttl_seconds, source.user_metadata,
        )  # fmt: skip
        if idempotency_key:
            self._answers[(owner, idempotency_key)] = (asked, record.path)
            entry = {"owner": owner, "key": idempotency_key, "request": asked, "tinker_path": record.path}
            with self._answers_file.open("a") as handle:
                handle.write(json.dumps(entry) + "\n")
        return {"tinker_path": record.path}

    def _new_run_id(self, request: CopyWeights) -> str:
        """The copy's training run: the session's slot when one is named, else a new run of its own."""
        if request.session_id is None and request.model_seq_id is None:
            return f"copy-{uuid.uuid4().hex[:12]}"
        if request.session_id is None or request.model_seq_id is None:
            raise InvalidArgument("give both session_id and model_seq_id, or neither (a destination project)")
        run_id = f"{request.session_id}:train:{request.model_seq_id}"
        if not RUN_ID.fullmatch(run_id):
            raise InvalidArgument(f"session_id {request.session_id!r} is not a session id (letters, digits, - _ . :)")
        if self.runs.known(run_id) or (self._root / run_id).exists():
            raise AlreadyExists(f"training run {run_id} already exists; copy into an unused model_seq_id")
        return run_id


def _link_tree(source: Path, target: Path) -> None:
    """`target` as hard links to `source`'s files, made whole under a temporary name and then renamed in."""
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}")
    try:
        shutil.copytree(source, staging, copy_function=_link_or_copy)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or one without hard links
        shutil.copy2(source, target)
